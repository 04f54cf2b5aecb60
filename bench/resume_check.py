"""Exact-resume check on any device: train once without interruption, once killed twice
(SIGKILL and SIGTERM) and resumed; print the largest weight difference.

    python bench/resume_check.py --device cuda

On the CPU the difference is 0 (the tests assert it). On a GPU, kernels may not be bit-for-bit
deterministic across processes; this prints what is observed.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "workspace" / "configs" / "data" / "tiny-corpus.jsonl"

RUN = """
name = "check"
model_name = "tiny-random"
hook_name = "blocks.0.hook_resid_post"
dataset_path = "{corpus}"
is_dataset_tokenized = false
context_size = 64
training_tokens = 1_000_000
train_batch_size_tokens = 2048
store_batch_size_prompts = 32
n_batches_in_buffer = 64
n_batches_for_norm_estimate = 5
device = "{device}"
[sae]
architecture = "topk"
d_in = 64
d_sae = 1024
k = 16
normalize_activations = "expected_average_only_in"
[tiny_random]
n_layers = 2
d_model = 64
n_ctx = 128
[resilience]
checkpoint_every_seconds = 1000
checkpoint_every_tokens = 50_000
status_every_seconds = 0.2
"""


def command(run_file: Path, runs: Path) -> list[str]:
    return [sys.executable, "-m", "lenslab_workspace.train.cli", str(run_file), "--runs-dir", str(runs)]


def wait_for_tokens(runs: Path, tokens: int) -> None:
    status = runs / "check" / "status.json"
    while True:
        try:
            import json

            if json.loads(status.read_text())["tokens_done"] >= tokens:
                return
        except (FileNotFoundError, ValueError, KeyError):
            pass
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(REPO / "workspace")}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        run_file = tmp / "run.toml"
        run_file.write_text(RUN.format(corpus=CORPUS, device=args.device))
        subprocess.run(command(run_file, tmp / "ref"), check=True, env=env, capture_output=True)
        for sig, tokens in ((signal.SIGKILL, 300_000), (signal.SIGTERM, 650_000)):
            proc = subprocess.Popen(command(run_file, tmp / "cut"), env=env, stderr=subprocess.DEVNULL)
            wait_for_tokens(tmp / "cut", tokens)
            proc.send_signal(sig)
            proc.wait()
        subprocess.run(command(run_file, tmp / "cut"), check=True, env=env, capture_output=True)

        from safetensors.torch import load_file

        a = load_file(str(tmp / "ref" / "check" / "final" / "sae_weights.safetensors"))
        b = load_file(str(tmp / "cut" / "check" / "final" / "sae_weights.safetensors"))
        worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
        scale = a["W_dec"].abs().mean().item()
        identical = all(bool((a[k] == b[k]).all()) for k in a)
        print(
            f"exact resume ({args.device}): bit-identical={identical}  max |dW| = {worst:.3e}  "
            f"(mean |W_dec| = {scale:.3e})"
        )


if __name__ == "__main__":
    main()
