"""status.json: the documented schema, replaced atomically while the run goes on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lenslab_workspace.train.status import STATES, StatusFile

from .conftest import read_status, run_train, start_train, wait_for_step, write_run_file

SCHEMA_KEYS = {
    "schema",
    "name",
    "state",
    "step",
    "tokens_done",
    "tokens_total",
    "tokens_per_second",
    "eta_seconds",
    "losses",
    "last_checkpoint",
    "resumed_from_step",
    "message",
    "mirror",
    "pid",
    "boot_id",
    "pid_start_ticks",
    "hostname",
    "started_at",
    "updated_at",
}


def test_status_file_rejects_fields_outside_the_schema(tmp_path: Path) -> None:
    status = StatusFile(tmp_path / "status.json", "x", 100)
    with pytest.raises(KeyError):
        status.update(bogus=1)
    with pytest.raises(ValueError):
        status.update(state="sleeping")
    status.update(state="running", step=3)
    status.write()
    written = json.loads((tmp_path / "status.json").read_text())
    assert set(written) == SCHEMA_KEYS
    assert written["state"] in STATES and written["step"] == 3
    assert not list(tmp_path.glob(".status.json.tmp-*"))


@pytest.mark.slow
def test_status_while_running_and_after_finishing(tmp_path: Path) -> None:
    run_file = write_run_file(tmp_path / "run.toml", {"training_tokens": 60_000})
    runs, run_dir = tmp_path / "runs", tmp_path / "runs" / "t"
    proc = start_train(run_file, runs)
    wait_for_step(proc, run_dir, 20)
    running = read_status(run_dir)
    assert running is not None
    assert set(running) == SCHEMA_KEYS
    assert running["pid"] == proc.pid
    assert running["tokens_total"] == 60_000
    assert running["tokens_per_second"] > 0 and running["eta_seconds"] >= 0
    assert "mse_loss" in running["losses"]
    assert proc.wait(timeout=120) == 0
    finished = read_status(run_dir)
    assert finished is not None and finished["state"] == "finished"
    assert finished["tokens_done"] >= 60_000
    assert finished["last_checkpoint"]["path"].endswith(f"step-{finished['last_checkpoint']['step']:09d}")
    again = run_train(run_file, runs)
    assert again.returncode == 0
    assert "run 't' already finished; the SAE is in" in again.stderr


def test_is_alive_tells_a_live_trainer_from_a_dead_one(tmp_path: Path) -> None:
    import socket
    import subprocess
    import sys

    from lenslab_workspace.train.status import is_alive

    status = StatusFile(tmp_path / "status.json", "x", 100)
    status.update(state="running")
    status.write()
    mine = json.loads((tmp_path / "status.json").read_text())
    assert mine["boot_id"] and mine["pid_start_ticks"]
    assert is_alive(mine) is True

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert is_alive({**mine, "pid": int(gone.stdout)}) is False  # exited: killed launches look like this
    assert is_alive({**mine, "pid_start_ticks": mine["pid_start_ticks"] - 1}) is False  # pid reused
    assert is_alive({**mine, "boot_id": "another-boot"}) is False  # the machine rebooted
    assert is_alive({**mine, "state": "finished"}) is False
    assert is_alive({**mine, "hostname": socket.gethostname() + "-elsewhere"}) is None


def test_tokens_per_second_follows_the_recent_pace_not_the_launch_average() -> None:
    from lenslab_workspace.train.progress import RateWindow

    window = RateWindow(now=0.0, tokens=0, seconds=30.0)
    assert window.rate(0.0, 0) is None
    # A slow minute (tokenizing, the norm estimate), then 1000 tokens/s.
    assert window.rate(60.0, 600) == 10.0
    for second in range(61, 121):
        rate = window.rate(float(second), 600 + 1000 * (second - 60))
    # Since launch it would be 60,600 / 120 s = 505 tokens/s; the window sees the pace now.
    assert rate == 1000.0
