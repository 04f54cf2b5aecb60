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
    "pid",
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
