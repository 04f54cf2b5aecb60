#!/usr/bin/env bash
# GPU check for lenslab-train on a machine with CUDA (not used by CI), in a few minutes:
#   1. CUDA training   the tiny example run, trained to its final SAE on the GPU
#   2. exact resume    bench/resume_check.py: killed twice and resumed vs uninterrupted
#   3. throughput      bench/bench_throughput.py: vs SAELens, prefetch_llm_batches on both
#   4. many SAEs       bench/bench_group.py: 8 SAEs vs 1, vs MultiSAETrainingRunner, vs 8 runs
#   5. first step      bench/bench_first_step.py: 10M vs 100M-token streamed corpus
#   6. checkpoint      bench/bench_training.py checkpoint-block: loop blocked per checkpoint
# Each step has its own time limit; a failed or timed-out step does not stop the others. The
# summary at the end names the card (nvidia-smi) and repeats each step's figures; the exit
# status is non-zero if any step failed. Without CUDA it stops at once with one line.
#
#   bash bench/gpu_check.sh                      # from anywhere; PYTHON=... picks the interpreter
#   GPU_CHECK_LOGS=/tmp/logs bash bench/gpu_check.sh   # keep each step's full output there
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
python=${PYTHON:-python3}
export PYTHONPATH="$PWD/workspace${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1

fail() {
    echo "gpu_check: $*" >&2
    exit 2
}

command -v nvidia-smi >/dev/null 2>&1 || fail "no NVIDIA driver (nvidia-smi not found); run this on a machine with a CUDA GPU"
card=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -n 1) ||
    fail "nvidia-smi finds no GPU; run this on a machine with a CUDA GPU"
[ -n "$card" ] || fail "nvidia-smi lists no GPU; run this on a machine with a CUDA GPU"
"$python" - <<'EOF' || fail "torch cannot use the GPU ($card); install a CUDA build of torch for $python"
import sys
import torch
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device")
EOF

logs=${GPU_CHECK_LOGS:-$(mktemp -d -t lenslab-gpu-check-XXXXXX)}
mkdir -p "$logs"
work=$(mktemp -d -t lenslab-gpu-check-run-XXXXXX)
trap 'rm -rf "$work"' EXIT
summary=()
failed=0

# step NAME SECONDS COMMAND...: run it with a time limit, its output shown and kept in the log
# folder; note its outcome and its figure lines (those the benches print with a ratio, etc.).
step() {
    local name=$1 limit=$2
    shift 2
    local log="$logs/$name.log" started rc outcome
    echo "== $name (limit ${limit} s)"
    started=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) outcome="ok" ;;
        124 | 137) outcome="TIMED OUT after ${limit} s" ;;
        *) outcome="FAILED (exit $rc)" ;;
    esac
    [ "$rc" -eq 0 ] || failed=1
    summary+=("$(printf '%-12s %-24s %5d s' "$name" "$outcome" $((SECONDS - started)))")
    while IFS= read -r line; do
        summary+=("    ${line#"${line%%[![:space:]]*}"}")
    done < <(grep -E 'ratio|bit-identical|tokens/s|finished|model:|device|dominate|first step' "$log" | grep -v '^  round' || true)
}

# shellcheck disable=SC2317  # called through bash -c (see below)
cuda_training() {
    local run="$work/tiny-cuda.toml" corpus="$PWD/workspace/configs/data/tiny-corpus.jsonl"
    sed -e 's|^device = "cpu"|device = "cuda"|' -e "s|^dataset_path = .*|dataset_path = \"$corpus\"|" \
        -e 's|^name = "tiny"|name = "tiny-cuda"|' workspace/configs/tiny.toml >"$run"
    grep -q '^device = "cuda"' "$run" || { echo "tiny.toml has no device line to set to cuda"; return 1; }
    "$python" -m lenslab_workspace.train.cli "$run" --runs-dir "$work/runs" || return 1
    "$python" - "$work/runs/tiny-cuda" <<'EOF'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
status = json.loads((run / "status.json").read_text())
assert status["state"] == "finished", status
assert (run / "final" / "sae_weights.safetensors").is_file(), "no final SAE"
print(f"CUDA training finished: {status['tokens_done']:,} tokens in {status['step']} steps, final SAE saved")
EOF
}

export -f cuda_training  # timeout runs programs, not functions: through a child bash
export python work
step cuda-training 180 bash -c cuda_training
step resume 240 "$python" bench/resume_check.py --device cuda
step throughput 360 "$python" bench/bench_throughput.py --device cuda --layers 12 --d-model 768 \
    --d-sae 16384 --batch 4096 --tokens 2000000 --rounds 3
step group 420 "$python" bench/bench_group.py --device cuda --tokens 2000000 --batch 4096 --separate 2 --rounds 2
step first-step 300 "$python" bench/bench_first_step.py --repeats 2
step checkpoint 180 "$python" bench/bench_training.py checkpoint-block --device cuda --repeats 3

echo
echo "== summary: $card ($(date -u '+%Y-%m-%d %H:%M UTC'); full output in $logs)"
printf '%s\n' "${summary[@]}"
exit "$failed"
