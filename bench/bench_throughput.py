"""Throughput against SAELens at its best settings: both with ``prefetch_llm_batches = true``.

    python bench/bench_throughput.py             # CPU, a random 4-layer d_model-512 model, a few minutes
    python bench/bench_throughput.py --quick     # smoke run: a 1-layer model, a few seconds
    python bench/bench_throughput.py --device cuda --layers 12 --d-model 768 --tokens 4000000 --batch 4096

One config (model, data, SAE, batch sizes, steps) is trained in the same process by plain
SAELens (``LanguageModelSAETrainingRunner``, its defaults otherwise) and by ``lenslab-train``
(checkpoints on, as a real run has them). Rounds alternate which goes first, so drift in the
machine's speed hits both; medians count, and each round's ratio is printed too. Each side is
timed twice: the training itself (SAELens's ``run()``; lenslab's loop up to the saved
``final/``) and end to end (also the model, the data and the SAE being built). Target:
lenslab / SAELens >= 1.0.

The model is a randomly initialised TransformerLens model (no download) sized so that its
forward pass is a large part of a step; the output says how large, on this machine.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars of both libraries would bury the figures
sys.path.insert(0, str(REPO / "workspace"))
sys.path.insert(0, str(REPO / "bench"))

from bench_group import forward_vs_sae_step, make_token_dataset  # noqa: E402

from lenslab_workspace.train.config import RunSettings, load_run_file  # noqa: E402
from lenslab_workspace.train.runner import TrainingRun  # noqa: E402

logging.getLogger("lenslab.train").setLevel(logging.WARNING)
logging.getLogger("sae_lens").setLevel(logging.WARNING)
TARGET = 1.0


def run_file(directory: Path, args: argparse.Namespace, dataset: Path) -> Path:
    path = directory / "throughput.toml"
    path.write_text(f"""
name = "bench-throughput"
model_name = "tiny-random"
hook_name = "blocks.{args.layers - 1}.hook_resid_post"
dataset_path = "{dataset}"
context_size = 128
training_tokens = {args.tokens}
train_batch_size_tokens = {args.batch}
store_batch_size_prompts = {args.batch // 256}
n_batches_in_buffer = {2 * args.batch // 128}
prefetch_llm_batches = true
device = "{args.device}"
seed = 1
[sae]
architecture = "standard"
d_in = {args.d_model}
d_sae = {args.d_sae}
l1_coefficient = 5.0
normalize_activations = "none"
[tiny_random]
n_layers = {args.layers}
d_model = {args.d_model}
n_heads = {max(1, args.d_model // 64)}
d_head = {min(64, args.d_model)}
d_mlp = {4 * args.d_model}
n_ctx = 128
[resilience]
checkpoint_every_seconds = 10
status_every_seconds = 2
""")
    return path


@dataclass
class Timing:
    training: float  # the training itself
    total: float  # model, data and SAE built, then trained


class TimedRun(TrainingRun):
    """lenslab-train's launch, with the seconds of its training loop noted."""

    train_seconds = 0.0

    def _train(self, built: Any) -> Any:
        start = time.perf_counter()
        try:
            return super()._train(built)
        finally:
            _sync(self.settings.runner_fields["device"])
            self.train_seconds = time.perf_counter() - start


def lenslab(settings: RunSettings, runs_dir: Path) -> Timing:
    start = time.perf_counter()
    run = TimedRun(settings, runs_dir, fresh=True)
    outcome = run.execute()
    assert outcome.exit_code == 0, outcome.message
    return Timing(run.train_seconds, time.perf_counter() - start)


def saelens(settings: RunSettings) -> Timing:
    """Plain SAELens on the same config (prefetch_llm_batches passes through), model and data."""
    import datasets
    from sae_lens import LanguageModelSAETrainingRunner

    from lenslab_workspace.train.models import load_language_model

    start = time.perf_counter()
    cfg = settings.runner_config()
    assert cfg.prefetch_llm_batches is True, "SAELens must run with its prefetch on"
    # Its notes about the overriding model and dataset, and its progress bar, would bury the figures.
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.manual_seed(cfg.seed)
        model, _, _ = load_language_model(settings, str(cfg.device))
        data = datasets.load_dataset("parquet", data_files=settings.runner_fields["dataset_path"], split="train")
        runner = LanguageModelSAETrainingRunner(cfg, override_dataset=data, override_model=model)
        trained = time.perf_counter()
        runner.run()
        _sync(str(cfg.device))
    end = time.perf_counter()
    return Timing(end - trained, end - start)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return f"{device} ({platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()})"


def model_parameters(settings: RunSettings) -> int:
    from lenslab_workspace.train.models import load_language_model

    model, _, _ = load_language_model(settings, "cpu")
    return sum(p.numel() for p in model.parameters())


def warm_up(tmp: Path, args: argparse.Namespace) -> None:
    """Both code paths once on a tiny model, unmeasured: the first launch in a process pays
    for lazy imports and allocator start-up, which would otherwise land on one side only."""
    small = argparse.Namespace(**{**vars(args), "layers": 1, "d_model": 64, "d_sae": 128, "tokens": 4 * args.batch})
    folder = tmp / "warm-up"
    folder.mkdir()
    settings = load_run_file(run_file(folder, small, make_token_dataset(folder / "tokens.parquet", 256, 128)))
    lenslab(settings, folder / "runs")
    saelens(settings)


def measure(args: argparse.Namespace) -> None:
    import datasets

    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory(prefix="lenslab-throughput-") as tmp_name:
        tmp = Path(tmp_name)
        # Twice the rows a run reads: neither library reaches the end of the data.
        dataset = make_token_dataset(tmp / "tokens.parquet", 2 * args.tokens // 128 + 64, 128)
        settings = load_run_file(run_file(tmp, args, dataset))
        forward, step = forward_vs_sae_step(settings, args.batch)
        print(
            f"throughput, prefetch_llm_batches = true on both sides; device {device_name(args.device)}; "
            f"load average {os.getloadavg()[0]:.1f} at the start"
        )
        print(
            f"  model: random {args.layers}-layer TransformerLens, d_model {args.d_model}, "
            f"{model_parameters(settings) / 1e6:.1f}M parameters; SAE: standard, d_sae {args.d_sae}, "
            f"on {settings.runner_fields['hook_name']}"
        )
        print(
            f"  {args.tokens:,} tokens per run, batch {args.batch}; model forward over one batch "
            f"{forward:.3f} s, one SAE step {step:.3f} s (forward = {forward / (forward + step):.0%} of a step)"
        )
        warm_up(tmp, args)
        ours: list[Timing] = []
        theirs: list[Timing] = []
        for index in range(args.rounds):
            order = ("lenslab", "saelens") if index % 2 else ("saelens", "lenslab")
            for side in order:
                if side == "lenslab":
                    ours.append(lenslab(settings, tmp / "runs"))
                else:
                    theirs.append(saelens(settings))
            print(
                f"  round {index + 1} of {args.rounds} ({' first, '.join(order)} second): "
                f"lenslab {args.tokens / ours[-1].training:10,.0f} tokens/s, "
                f"SAELens {args.tokens / theirs[-1].training:10,.0f} tokens/s",
                flush=True,
            )
        report(args.tokens, ours, theirs)
    print(f"  load average {os.getloadavg()[0]:.1f} at the end, {os.cpu_count()} CPUs (other work slows both sides)")


def report(tokens: int, ours: list[Timing], theirs: list[Timing]) -> None:
    # Each round's two runs are adjacent in time: their ratio is the least disturbed by drift.
    paired = [b.training / a.training for a, b in zip(ours, theirs, strict=True)]
    listed = ", ".join(f"{r:.2f}" for r in paired)
    print(f"  training, lenslab / SAELens per round: {listed}; median {statistics.median(paired):.3f}")
    for what in ("training", "total"):
        a = tokens / statistics.median(getattr(t, what) for t in ours)
        b = tokens / statistics.median(getattr(t, what) for t in theirs)
        label = "training" if what == "training" else "end to end (model, data, SAE built + trained)"
        print(f"  {label}, medians of {len(ours)}:")
        print(f"    lenslab-train (checkpoint every 10 s): {a:12,.0f} tokens/s")
        print(f"    SAELens LanguageModelSAETrainingRunner: {b:12,.0f} tokens/s")
        met = "met" if a / b >= TARGET else "NOT met"
        print(f"    ratio lenslab / SAELens = {a / b:.3f}   target >= {TARGET}: {met}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=49_152, help="training tokens per run")
    parser.add_argument("--batch", type=int, default=2048, help="train_batch_size_tokens (a multiple of 256)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--d-sae", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians are reported")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1-layer d_model-64 model, one round")
    args = parser.parse_args()
    if args.batch % 256:
        parser.error(f"--batch {args.batch}: must be a multiple of 256 (2 model batches of 128-token rows)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA device; use --device cpu")
    if args.quick:
        args.layers, args.d_model, args.d_sae, args.tokens, args.batch, args.rounds = 1, 64, 256, 8192, 1024, 1
    measure(args)


if __name__ == "__main__":
    main()
