"""Time to the first training step with a streamed local corpus of 10M vs 100M tokens.

    python bench/bench_first_step.py              # both corpora, 2 launches each
    python bench/bench_first_step.py --small 2000000 --large 20000000 --repeats 1

Each launch is a fresh ``lenslab-train`` process (``streaming = true``, ``training_tokens`` as
large as the corpus, so the whole corpus is the run's data), timed from its start until
``status.json`` shows step 1; the launch is then killed. The dataset is tokenized in the
background, so the first step should not wait for the corpus: the target is large / small
<= 1.5. The model is lenslab's tiny-random model (a byte tokenizer: one token per byte) on
the CPU, so the figures measure the data path, not a model. The corpora are generated here.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "workspace" / "configs" / "data" / "tiny-corpus.jsonl"
TARGET = 1.5


def make_corpus(path: Path, tokens: int) -> Path:
    """A jsonl file of about ``tokens`` bytes of text (the tiny-random tokenizer's tokens)."""
    lines = [line for line in SAMPLE.read_text().splitlines() if line.strip()]
    block = "\n".join(lines) + "\n"
    with open(path, "w") as handle:
        written = 0
        while written < tokens:
            handle.write(block)
            written += len(block)
    return path


def run_file(directory: Path, corpus: Path, tokens: int) -> Path:
    path = directory / f"{corpus.stem}.toml"
    path.write_text(
        f"""
name = "first-step"
model_name = "tiny-random"
hook_name = "blocks.0.hook_resid_post"
dataset_path = "{corpus}"
streaming = true
context_size = 128
training_tokens = {tokens}
train_batch_size_tokens = 1024
store_batch_size_prompts = 16
n_batches_in_buffer = 16
lr = 3e-4
device = "cpu"

[sae]
architecture = "topk"
d_in = 32
d_sae = 128
k = 8

[tiny_random]
n_layers = 1
d_model = 32
n_heads = 2
d_head = 16
d_mlp = 64
n_ctx = 128

[resilience]
status_every_seconds = 0.05
"""
    )
    return path


def seconds_to_first_step(run: Path, runs: Path) -> float:
    """Start ``lenslab-train``; the seconds until status.json shows a step; then kill it."""
    status = runs / "first-step" / "status.json"
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(REPO / "workspace")}
    command = [sys.executable, "-m", "lenslab_workspace.train.cli", str(run), "--runs-dir", str(runs)]
    started = time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(
                    f"lenslab-train exited ({proc.returncode}): {proc.stderr.read() if proc.stderr else ''}"
                )
            try:
                state = json.loads(status.read_text())
            except (OSError, ValueError):
                state = {}
            if state.get("state") == "running" and state.get("step", 0) >= 1:
                return time.monotonic() - started
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def measure(tokens: int, repeats: int, work: Path) -> tuple[float, list[float]]:
    directory = work / f"c{tokens}"
    directory.mkdir()
    corpus = make_corpus(directory / f"corpus-{tokens}.jsonl", tokens)
    run = run_file(directory, corpus, tokens)
    times = [seconds_to_first_step(run, directory / f"runs{i}") for i in range(repeats)]
    return statistics.median(times), times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=10_000_000, help="tokens of the baseline corpus")
    parser.add_argument("--large", type=int, default=100_000_000, help="tokens of the large corpus")
    parser.add_argument("--repeats", type=int, default=2, help="launches per corpus (median)")
    args = parser.parse_args()
    print("model: tiny-random (byte tokenizer) on the CPU; corpus: generated local jsonl, streaming = true")
    with tempfile.TemporaryDirectory(prefix="lenslab-first-step-") as tmp:
        small, small_all = measure(args.small, args.repeats, Path(tmp))
        large, large_all = measure(args.large, args.repeats, Path(tmp))
    ratio = large / small
    for tokens, median, times in ((args.small, small, small_all), (args.large, large, large_all)):
        launches = ", ".join(f"{t:.2f}" for t in times)
        print(f"time to first step, {tokens:,} tokens: {median:.2f} s (launches: {launches})")
    print(f"ratio large/small: {ratio:.2f}x (target <= {TARGET}x): {'met' if ratio <= TARGET else 'NOT met'}")
    return 0 if ratio <= TARGET else 1


if __name__ == "__main__":
    raise SystemExit(main())
