"""The training loop's schedule, for one SAE or a group: step, snapshot and report on time, stop when asked.

Checkpoints are taken every ``checkpoint_every_tokens`` tokens or ``checkpoint_every_seconds``
seconds, whichever comes first; status.json is rewritten every ``status_every_seconds``. What
a step, a snapshot and the losses are is the caller's (runner.py for one SAE, group.py for
several in lockstep, counted by the first one's trainer).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from lenslab_workspace.train.checkpoint import CheckpointWriter, Snapshot
from lenslab_workspace.train.progress import Progress, RateWindow

Stepper = Callable[[], Any]  # one training step; returns its output(s)
Snapshotter = Callable[[], Snapshot]
Losses = Callable[[Any], dict[str, float]]  # a step's output -> the losses status.json shows


def run_steps(
    trainer: Any,
    writer: CheckpointWriter,
    resilience: Any,
    step: Stepper,
    snapshot: Snapshotter,
    losses: Losses,
    stopping: Callable[[], bool],
    report: Callable[[float | None, dict[str, float]], None],
) -> bool:
    """``step`` until ``trainer`` has trained all its tokens (False), or ``stopping()`` says so
    before then (True). Snapshots go to ``writer``; ``report(rate, losses)`` writes status."""
    res, total = resilience, trainer.cfg.total_training_samples
    progress = Progress(total, trainer.n_training_samples)
    window = RateWindow(time.monotonic(), trainer.n_training_samples)
    last_checkpoint_time, last_checkpoint_tokens = time.monotonic(), trainer.n_training_samples
    last_status = 0.0
    try:
        while trainer.n_training_samples < total:
            output = step()
            if stopping():
                return bool(trainer.n_training_samples < total)
            now = time.monotonic()
            tokens_due = res.checkpoint_every_tokens is not None and (
                trainer.n_training_samples - last_checkpoint_tokens >= res.checkpoint_every_tokens
            )
            if tokens_due or now - last_checkpoint_time >= res.checkpoint_every_seconds:
                writer.submit(snapshot())
                last_checkpoint_time, last_checkpoint_tokens = now, trainer.n_training_samples
            if now - last_status >= res.status_every_seconds:
                last_status = now
                rate, latest = window.rate(now, trainer.n_training_samples), losses(output)
                report(rate, latest)
                progress.update(trainer.n_training_samples, trainer.n_training_steps, latest, rate)
        return False
    finally:
        progress.close()
