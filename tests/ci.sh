#!/usr/bin/env bash
# The test command: set up everything the tests need, start the real services they use
# (sshd, dockerd, the test VM image), then lint, type-check and run every test, slow ones too.
# A service that cannot start fails this script; no test is skipped for lack of one.
set -euo pipefail
cd "$(dirname "$0")/.."

LENSLAB_DEV=1 bash provision/python-env.sh
bash tests/services/start.sh

.venv/bin/ruff check .
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
