#!/usr/bin/env bash
# The test command: set up everything the tests need, start the real services they use
# (sshd, dockerd, the test VM image), then lint, type-check and run every test, slow ones too.
# A service that cannot start fails this script; no test is skipped for lack of one.
#
# The suite runs as three groups at once: the tests that drive boxes and containers (they mostly
# wait on sshd, Docker and the boxes' trainers, and share box and container names, so they run
# one at a time), the watcher's, Slurm's and SkyPilot's tests, and everything else (training,
# evaluation, notebooks: CPU work with no names in common). Arguments go to a single pytest run instead: `bash tests/ci.sh tests/workspace -x`.
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
run_group() {  # name, marker expression, then paths or options
  local name=$1 markers=$2
  shift 2
  .venv/bin/python -m pytest -m "$markers" -p no:cacheprovider --junitxml="$out/$name.xml" "$@" >"$out/$name.log" 2>&1
}
# The watcher's tests (preemptions on emulated clouds), the Slurm cluster's and the SkyPilot
# export's spend most of their time waiting for polls, schedulers and relaunches: a third group
# beside the other two. Their containers carry names and labels of their own, so they never
# touch the box group's. The evaluation CLI's tests (about a quarter of the rest's time) join
# them, so the three groups take about as long as one another.
cluster_tests=(tests/lenslab/test_watch*.py tests/slurm tests/lenslab/test_export_skypilot.py
  tests/analysis/test_eval_cli.py)
ignore_clusters=()
for path in "${cluster_tests[@]}"; do ignore_clusters+=("--ignore=$path"); done
run_group boxes "docker" "${ignore_clusters[@]}" & boxes=$!
run_group clusters "docker or not docker" "${cluster_tests[@]}" & clusters=$!
run_group rest "not docker" "${ignore_clusters[@]}" & rest=$!
statuses=()
for pid in "$boxes" "$clusters" "$rest"; do
  status=0
  wait "$pid" || status=$?
  statuses+=("$status")
done
for group in boxes clusters rest; do
  echo "=== tests: $group ==="
  cat "$out/$group.log"
done
.venv/bin/python tests/summary.py "$out/boxes.xml" "$out/clusters.xml" "$out/rest.xml"
# pytest's 5 means "no test collected": a group that ran nothing is a broken suite, not a pass.
for status in "${statuses[@]}"; do [ "$status" -eq 0 ] || exit 1; done
