#!/usr/bin/env bash
# GPU check for lenslab-train, for a machine with CUDA (not used by CI): throughput against
# SAELens, checkpoint blocking time, and exact resume (kill + resume vs uninterrupted), in
# well under 5 minutes. Run from the repository root: bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
export PYTHONPATH="$PWD/workspace${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

"$python" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print("device:", torch.cuda.get_device_name(0))'

echo "== checkpoint blocking time"
"$python" bench/bench_training.py checkpoint-block --device cuda --repeats 3
echo "== throughput"
"$python" bench/bench_training.py throughput --device cuda --tokens 20000000 --d-sae 16384 --rounds 1
echo "== exact resume on CUDA"
"$python" bench/resume_check.py --device cuda
