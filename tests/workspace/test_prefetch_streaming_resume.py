"""Exact resume with ``prefetch_llm_batches`` on and with a streamed dataset: SIGKILL at random
points, resume, and the final SAE equals the uninterrupted run's (which has neither) bit for bit."""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path
from typing import Any

import pytest

from lenslab.contract import EXIT_INTERRUPTED

from .conftest import (
    CORPUS,
    assert_bit_identical,
    final_weights,
    kill,
    read_status,
    run_train,
    start_train,
    wait_for,
    wait_for_step,
    write_run_file,
)

pytestmark = pytest.mark.slow


def kill_at_random_steps(run_file: Path, runs: Path, seed: int) -> list[int]:
    """SIGKILL a launch at one random step in each third of the small run; return the steps."""
    chooser = random.Random(seed)
    steps = [chooser.randint(2, 35), chooser.randint(36, 75), chooser.randint(76, 112)]
    for step in steps:
        proc = start_train(run_file, runs)
        wait_for_step(proc, runs / "t", step)
        kill(proc)
        assert proc.returncode == -9
    return steps


def finish(run_file: Path, runs: Path) -> None:
    result = run_train(run_file, runs)
    assert result.returncode == 0, result.stderr
    assert "resuming from step-" in result.stderr


def test_prefetch_gives_the_same_sae_and_resumes_exactly(tmp_path: Path, reference_run: dict[str, Any]) -> None:
    # Uninterrupted with prefetch: the batches, so the SAE, are those without it (SAELens's order).
    whole = tmp_path / "whole"
    result = run_train(write_run_file(tmp_path / "whole.toml", {"prefetch_llm_batches": True}), whole)
    assert result.returncode == 0, result.stderr
    assert_bit_identical(final_weights(whole / "t"), reference_run)
    # Killed at random points with batches in flight (two refills ahead), then resumed.
    seed = int.from_bytes(os.urandom(4), "little")
    run_file = write_run_file(tmp_path / "run.toml", {"prefetch_llm_batches": 2})
    steps = kill_at_random_steps(run_file, tmp_path / "runs", seed)
    finish(run_file, tmp_path / "runs")
    try:
        assert_bit_identical(final_weights(tmp_path / "runs" / "t"), reference_run)
    except AssertionError as exc:
        raise AssertionError(f"killed at steps {steps} (seed {seed}): {exc}") from exc


def test_streamed_dataset_resumes_exactly(tmp_path: Path, reference_run: dict[str, Any]) -> None:
    seed = int.from_bytes(os.urandom(4), "little")
    run_file = write_run_file(tmp_path / "run.toml", {"streaming": True, "prefetch_llm_batches": True})
    steps = kill_at_random_steps(run_file, tmp_path / "runs", seed)
    finish(run_file, tmp_path / "runs")
    try:
        assert_bit_identical(final_weights(tmp_path / "runs" / "t"), reference_run)
    except AssertionError as exc:
        raise AssertionError(f"killed at steps {steps} (seed {seed}): {exc}") from exc


def test_training_starts_before_tokenizing_ends_and_a_relaunch_continues_it(tmp_path: Path) -> None:
    corpus = tmp_path / "big.jsonl"
    # ~25 MB and a run that needs all of it: tens of seconds of tokenizing even on a fast machine,
    # against the seconds to the first step (the test kills the run long before it would end).
    corpus.write_text(CORPUS.read_text() * 60)
    run_file = write_run_file(
        tmp_path / "run.toml", {"streaming": True, "dataset_path": str(corpus), "training_tokens": 20_000_000}
    )
    runs, data = tmp_path / "runs", tmp_path / "runs" / "t" / "data"
    proc = start_train(run_file, runs)
    wait_for_step(proc, runs / "t", 1)
    # A step was taken while the token file is still partial.
    assert list(data.glob(".tokens-*.partial")) and not list(data.glob("tokens-*.npy"))
    wait_for(lambda: bool(list(data.glob(".tokens-*.progress.json"))), what="a progress record")
    kill(proc)
    assert not list(data.glob("tokens-*.npy")), "tokenizing finished before the kill: use more data"
    proc = start_train(run_file, runs)
    log = runs / "t" / "train.log"
    wait_for(lambda: "continuing to tokenize the dataset after" in log.read_text(), what="continued tokenizing")
    wait_for_step(proc, runs / "t", 2)
    kill(proc, signal.SIGTERM)
    assert proc.returncode == EXIT_INTERRUPTED
    assert (read_status(runs / "t") or {}).get("state") == "interrupted"
