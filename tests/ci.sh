#!/usr/bin/env bash
# The test command: set up everything the tests need, start the real services they use
# (sshd, dockerd, the test VM image), then lint, type-check and run every test, slow ones too.
# A service that cannot start fails this script; no test is skipped for lack of one.
#
# The suite runs as two groups at once: the tests that drive boxes and containers (they mostly
# wait on sshd, Docker and the boxes' trainers, and share box and container names, so they run
# one at a time) beside everything else (training, evaluation, notebooks: CPU work with no names
# in common). Arguments go to a single pytest run instead: `bash tests/ci.sh tests/workspace -x`.
set -euo pipefail
cd "$(dirname "$0")/.."

LENSLAB_DEV=1 bash provision/python-env.sh
bash tests/services/start.sh

.venv/bin/ruff check .
.venv/bin/mypy

if [ "$#" -gt 0 ]; then
  exec .venv/bin/python -m pytest "$@"
fi

out=$(mktemp -d "${TMPDIR:-/tmp}/lenslab-ci.XXXXXX")
run_group() {  # name, marker expression
  .venv/bin/python -m pytest -m "$2" -p no:cacheprovider --junitxml="$out/$1.xml" >"$out/$1.log" 2>&1
}
run_group boxes "docker" & boxes=$!
run_group rest "not docker" & rest=$!
status=0
wait "$boxes" || status=$?
boxes_status=$status
status=0
wait "$rest" || status=$?
rest_status=$status
for group in boxes rest; do
  echo "=== tests: $group ==="
  cat "$out/$group.log"
done
.venv/bin/python tests/summary.py "$out/boxes.xml" "$out/rest.xml"
# pytest's 5 means "no test collected": a group that ran nothing is a broken suite, not a pass.
[ "$boxes_status" -eq 0 ] && [ "$rest_status" -eq 0 ]
