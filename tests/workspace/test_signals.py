"""SIGTERM, SIGINT and SIGHUP: finish the step, commit a checkpoint, exit; resume loses nothing."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from lenslab_workspace.train.checkpoint import step_dirs, verify

from .conftest import (
    assert_bit_identical,
    final_weights,
    read_status,
    run_train,
    start_train,
    wait_for_step,
    write_run_file,
)

pytestmark = pytest.mark.slow

EXIT_INTERRUPTED = 75


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_signal_checkpoints_and_resume_loses_no_step(
    tmp_path: Path, reference_run: dict[str, Any], sig: signal.Signals
) -> None:
    run_file = write_run_file(tmp_path / "run.toml")
    runs, run_dir = tmp_path / "runs", tmp_path / "runs" / "t"
    proc = start_train(run_file, runs)
    wait_for_step(proc, run_dir, 33)
    sent = time.monotonic()
    proc.send_signal(sig)
    proc.wait(timeout=30)
    elapsed = time.monotonic() - sent
    output = proc.stdout.read() if proc.stdout else ""

    assert proc.returncode == EXIT_INTERRUPTED, output
    assert elapsed < 30
    assert f"{sig.name} received; finishing this step and saving a checkpoint" in output
    status = read_status(run_dir)
    assert status is not None and status["state"] == "interrupted"
    stopped_at = status["step"]
    newest = step_dirs(run_dir / "checkpoints")[0]
    assert verify(newest)["step"] == stopped_at
    assert status["last_checkpoint"]["step"] == stopped_at

    result = run_train(run_file, runs)
    assert result.returncode == 0, result.stderr
    assert f"resuming from {newest.name} (step {stopped_at}," in result.stderr
    assert_bit_identical(final_weights(run_dir), reference_run)
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"


def test_second_signal_exits_at_once_without_damage(tmp_path: Path, reference_run: dict[str, Any]) -> None:
    run_file = write_run_file(tmp_path / "run.toml")
    runs, run_dir = tmp_path / "runs", tmp_path / "runs" / "t"
    proc = start_train(run_file, runs)
    wait_for_step(proc, run_dir, 21)
    # Two different signals: the kernel merges a repeated signal that is still pending into one.
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGHUP)
    proc.wait(timeout=30)
    output = proc.stdout.read() if proc.stdout else ""
    assert proc.returncode == 130, output
    assert "exiting now" in output
    for path in step_dirs(run_dir / "checkpoints"):
        verify(path)
    result = run_train(run_file, runs)
    assert result.returncode == 0, result.stderr
    assert_bit_identical(final_weights(run_dir), reference_run)
