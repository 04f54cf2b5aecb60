"""Training benchmarks: lenslab-train against plain SAELens, measured side by side in one run.

    python bench/bench_training.py throughput        # tokens/s, checkpoints every 10 s vs none
    python bench/bench_training.py checkpoint-block  # loop blocked per checkpoint, GPT-2-small scale
    python bench/bench_training.py resume            # resume latency at 10 % and 90 % of 150k sequences
    python bench/bench_training.py all

Each prints the two figures and their ratio with the target next to it. Models are randomly
initialised TransformerLens models (no download), so the figures measure the training
machinery, not a particular model. ``--device cuda`` runs the same on a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars of both libraries would bury the figures
sys.path.insert(0, str(REPO / "workspace"))

from lenslab_workspace.train.config import RunSettings, load_run_file  # noqa: E402
from lenslab_workspace.train.runner import TrainingRun  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
from bench_throughput import TimedRun  # noqa: E402

logging.getLogger("lenslab.train").setLevel(logging.WARNING)


def write_run(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def throughput_run_file(directory: Path, device: str, tokens: int, dataset: Path, d_sae: int = 2048) -> Path:
    return write_run(
        directory / "throughput.toml",
        f"""
name = "bench-throughput"
model_name = "tiny-random"
hook_name = "blocks.1.hook_resid_post"
dataset_path = "{dataset}"
is_dataset_tokenized = true
context_size = 128
training_tokens = {tokens}
train_batch_size_tokens = 4096
store_batch_size_prompts = 16
n_batches_in_buffer = 64
n_batches_for_norm_estimate = 10
device = "{device}"
[sae]
architecture = "standard"
d_in = 256
d_sae = {d_sae}
l1_coefficient = 5.0
normalize_activations = "expected_average_only_in"
[tiny_random]
n_layers = 2
d_model = 256
n_heads = 4
d_head = 64
d_mlp = 1024
n_ctx = 128
[resilience]
checkpoint_every_seconds = 10
status_every_seconds = 2
""",
    )


def make_token_dataset(path: Path, n_sequences: int, context: int, vocab: int = 256) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, size=(n_sequences, context), dtype=np.int32)
    pq.write_table(pa.table({"input_ids": pa.array(list(tokens))}), path)
    return path


def saelens_runner(settings: RunSettings) -> Any:
    """SAELens's own LanguageModelSAETrainingRunner on the same config, model and data."""
    import datasets
    from sae_lens import LanguageModelSAETrainingRunner

    from lenslab_workspace.train.models import load_language_model

    cfg = settings.runner_config()
    model, _, _ = load_language_model(settings, str(cfg.device))
    dataset = datasets.load_dataset("parquet", data_files=settings.runner_fields["dataset_path"], split="train")
    torch.manual_seed(cfg.seed)
    return LanguageModelSAETrainingRunner(cfg, override_dataset=dataset, override_model=model)


def lenslab_built(settings: RunSettings, runs_dir: Path) -> tuple[TrainingRun, Any]:
    """A launch opened and built (model, data stream, trainer), not yet training."""
    run = TrainingRun(settings, runs_dir)
    run.cfg = settings.runner_config()
    run._open()
    return run, run._build()


def bench_throughput(device: str, tokens: int, rounds: int, d_sae: int) -> None:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        dataset = make_token_dataset(tmp / "tokens.parquet", 20_000, 128)
        settings = load_run_file(throughput_run_file(tmp, device, tokens, dataset, d_sae))
        ours, theirs = [], []
        for _ in range(rounds):  # alternate, so drift in machine speed hits both
            runner = saelens_runner(settings)
            start = time.perf_counter()
            runner.run()
            theirs.append(tokens / (time.perf_counter() - start))
            run = TimedRun(settings, tmp / "runs", fresh=True)
            outcome = run.execute()
            ours.append(tokens / run.train_seconds)
            assert outcome.exit_code == 0, outcome.message
            checkpoints = len(list((tmp / "runs" / settings.name / "checkpoints").glob("step-*")))
        a, b = statistics.median(ours), statistics.median(theirs)
        print(f"throughput ({device}, {tokens:,} tokens, {rounds} rounds, d_in 256, d_sae {d_sae}, standard SAE)")
        print(f"  lenslab-train, checkpoint every 10 s : {a:12,.0f} tokens/s  (kept {checkpoints} checkpoints)")
        print(f"  SAELens LanguageModelSAETrainingRunner: {b:12,.0f} tokens/s  (no checkpoints)")
        print(f"  ratio lenslab / SAELens = {a / b:.3f}   target >= 0.97")


def bench_checkpoint_block(device: str, repeats: int) -> None:
    """Blocking cost per checkpoint: lenslab's snapshot vs SAELens's synchronous save."""
    from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig, StandardTrainingSAEConfig
    from sae_lens.saes.sae import TrainingSAE
    from sae_lens.training.sae_trainer import SAETrainer

    from lenslab_workspace.train.checkpoint import CheckpointWriter
    from lenslab_workspace.train.state import take_snapshot

    d_in, d_sae = 768, 24576
    cfg = LanguageModelSAERunnerConfig(
        sae=StandardTrainingSAEConfig(d_in=d_in, d_sae=d_sae, device=device),
        logger=LoggingConfig(log_to_wandb=False),
        device=device,
        checkpoint_path=None,
        output_path=None,
        train_batch_size_tokens=4096,
    )
    sae = TrainingSAE.from_dict(cfg.get_training_sae_cfg_dict()).to(device)
    batches = iter(lambda: torch.randn(4096, d_in, device=device), None)
    trainer = SAETrainer(cfg=cfg.to_sae_trainer_config(), sae=sae, data_provider=batches)
    trainer.step(next(batches))  # populates Adam's moment estimates: the state has its full size

    stream = _stream_with_full_buffer(d_in, device)
    sync_times, blocked_times, background_times = [], [], []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        writer = CheckpointWriter(tmp / "lenslab", keep_last=1)
        (tmp / "lenslab").mkdir()
        trainer.optimizer.register_step_pre_hook(lambda *_: writer.wait_staged())
        for i in range(repeats):
            start = time.perf_counter()
            trainer.save_checkpoint(checkpoint_name=f"sync-{i}", base_path=tmp / "saelens")
            _sync(device)
            sync_times.append(time.perf_counter() - start)
            shutil.rmtree(tmp / "saelens")

            # lenslab: what the loop waits for is the snapshot, plus whatever the next
            # optimizer step has to wait for the background copy of the large tensors.
            waited_before = writer.blocked_seconds
            start = time.perf_counter()
            writer.submit(take_snapshot(trainer, stream, "bench", {}))
            snapshot_time = time.perf_counter() - start
            trainer.step(next(batches))
            _sync(device)
            blocked_times.append(snapshot_time + writer.blocked_seconds - waited_before)
            start = time.perf_counter()
            writer.wait()
            background_times.append(time.perf_counter() - start)
    sync, snap, background = (statistics.median(t) for t in (sync_times, blocked_times, background_times))
    print(f"checkpoint blocking time ({device}, d_in {d_in}, d_sae {d_sae}, Adam, median of {repeats})")
    print(f"  SAELens save_checkpoint (synchronous, blocks the loop): {sync * 1000:8.0f} ms")
    print(f"  lenslab snapshot + wait at the next optimizer step    : {snap * 1000:8.0f} ms")
    print(f"  lenslab write still running after that step           : {background * 1000:8.0f} ms, not blocking")
    print(f"  ratio blocked lenslab / SAELens = {snap / sync:.3f}   target <= 0.10")


def _stream_with_full_buffer(d_in: int, device: str) -> Any:
    """An ActivationStream whose mixing buffer is as full as SAELens's defaults make it."""
    from lenslab_workspace.train.data import ActivationStream

    class _Model:
        class cfg:  # mimics HookedTransformer.cfg
            device = "cpu"

    runner = {
        "hook_name": "blocks.8.hook_resid_pre",
        "context_size": 128,
        "n_batches_in_buffer": 64,
        "store_batch_size_prompts": 32,
        "train_batch_size_tokens": 4096,
    }
    stream = ActivationStream(_Model(), np.zeros((64, 128), dtype=np.int32), runner, d_in, None)
    stream._storage = torch.randn(4096, d_in, device=device)
    stream._serving = torch.randn(4096, d_in, device=device)
    return stream


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_resume(device: str, n_sequences: int) -> None:
    """Process-independent resume latency: from 'find checkpoint' to the first new step done."""
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        dataset = make_token_dataset(tmp / "tokens.parquet", n_sequences, 128)
        run_file = throughput_run_file(tmp, device, n_sequences * 128, dataset)
        text = run_file.read_text().replace('name = "bench-throughput"', 'name = "bench-resume"')
        text = text.replace("n_batches_in_buffer = 64", "n_batches_in_buffer = 32")
        settings = load_run_file(write_run(run_file, text))
        # One real checkpoint after a few steps; copies of it are then moved to 10 % and 90 %
        # of the data, which is all that differs between the two resumes.
        run, built = lenslab_built(settings, tmp / "runs")
        for _ in range(3):
            built.trainer.step(next(built.stream))
            built.trainer.n_training_steps += 1
        if hasattr(built.stream.tokens, "wait_complete"):  # the token array is complete before timing
            built.stream.tokens.wait_complete()
        run._close()
        ours: dict[float, list[float]] = {0.1: [], 0.9: []}
        theirs: dict[float, float] = {}
        # lenslab twice per position, alternating, so one-time warm-up costs do not land on one side.
        for fraction in (0.1, 0.9, 0.1, 0.9):
            position = int(n_sequences * fraction)
            _write_checkpoint_at(built, run.config_hash, position, tmp / "runs" / settings.name / "checkpoints")
            resumed = TrainingRun(settings, tmp / "runs")
            resumed.cfg = settings.runner_config()
            start = time.perf_counter()
            again = resumed._build()  # finds the checkpoint, restores the trainer and the stream
            again.trainer.step(next(again.stream))
            _sync(device)
            ours[fraction].append(time.perf_counter() - start)
            assert again.resumed_from is not None and again.stream.position > position
            if fraction not in theirs:
                theirs[fraction] = _saelens_resume(settings, position)
            shutil.rmtree(tmp / "runs" / settings.name / "checkpoints")
            (tmp / "runs" / settings.name / "checkpoints").mkdir()
    mine = {fraction: min(times) for fraction, times in ours.items()}  # best of two: warm-up excluded
    print(f"resume latency ({device}, {n_sequences:,} sequences of 128 tokens; checkpoint found -> first new step)")
    for fraction in (0.1, 0.9):
        print(
            f"  at {fraction:.0%}: lenslab {mine[fraction]:6.2f} s   SAELens (fast-forward) {theirs[fraction]:6.2f} s"
        )
    print(
        f"  ratio 90 %/10 %: lenslab {mine[0.9] / mine[0.1]:.2f} (target <= 1.2)   "
        f"SAELens {theirs[0.9] / theirs[0.1]:.2f}"
    )


def _write_checkpoint_at(built: Any, config_hash: str, position: int, checkpoints: Path) -> None:
    from lenslab_workspace.train.checkpoint import commit
    from lenslab_workspace.train.runner import versions
    from lenslab_workspace.train.state import take_snapshot

    # An empty mixing buffer makes the first resumed step read the data at the saved position,
    # the part that SAELens pays for in proportion to the position.
    stream = built.stream
    saved = (stream.position, stream._storage, stream._serving)
    stream.position, stream._storage, stream._serving = position, None, None
    commit(take_snapshot(built.trainer, stream, config_hash, versions()), checkpoints)
    stream.position, stream._storage, stream._serving = saved


def _saelens_resume(settings: RunSettings, position: int) -> float:
    """SAELens's resume: ActivationsStore.load_from_checkpoint fast-forwards to the position."""
    from safetensors.torch import save_file

    runner = saelens_runner(settings)
    with tempfile.TemporaryDirectory() as tmp_name:
        state = Path(tmp_name) / "activations_store_state.safetensors"
        save_file({"n_dataset_processed": torch.tensor(position)}, str(state))
        store = runner.activations_store
        start = time.perf_counter()
        with contextlib.redirect_stderr(io.StringIO()):  # its fast-forward progress bar
            store.load(str(state))
            store.next_batch()
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=["throughput", "checkpoint-block", "resume", "all"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=1_000_000, help="training tokens per throughput run")
    parser.add_argument("--d-sae", type=int, default=2048, help="SAE width for the throughput run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sequences", type=int, default=150_000)
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.which in ("checkpoint-block", "all"):
        bench_checkpoint_block(args.device, args.repeats)
    if args.which in ("resume", "all"):
        bench_resume(args.device, args.sequences)
    if args.which in ("throughput", "all"):
        bench_throughput(args.device, args.tokens, args.rounds, args.d_sae)


if __name__ == "__main__":
    main()
