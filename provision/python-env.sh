#!/usr/bin/env bash
# Create (or bring up to date) the Python environment that runs lenslab and lenslab-workspace
# on this machine: a virtualenv at ./.venv with both packages installed in editable mode.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${LENSLAB_VENV:-.venv}
python=${PYTHON:-python3}

if [ ! -x "$venv/bin/python" ]; then
  echo "python-env: creating $venv"
  command -v "$python" >/dev/null || { echo "python-env: error: $python not found; install Python 3.10 or newer" >&2; exit 1; }
  "$python" -m venv "$venv" || {
    rm -rf "$venv"
    echo "python-env: error: '$python -m venv' failed; on Debian/Ubuntu install python3-venv (apt-get install python3-venv)" >&2
    exit 1
  }
fi

# torch first and pinned: an unpinned torch pulled in by sae-lens would fetch a multi-GB CUDA
# build; on a GPU box the Dockerfile installs the CUDA build it wants instead.
torch_spec=${LENSLAB_TORCH_SPEC:-torch==2.13.0}
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  echo "python-env: installing $torch_spec"
  "$venv/bin/pip" install --quiet "$torch_spec"
fi

extras=""
[ "${LENSLAB_DEV:-0}" = "1" ] && extras="[dev]"
echo "python-env: installing lenslab$extras and lenslab-workspace (editable)"
"$venv/bin/pip" install --quiet --disable-pip-version-check -e ".$extras" -e ./workspace
echo "python-env: ready ($venv)"
