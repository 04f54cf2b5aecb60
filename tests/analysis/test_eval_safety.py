"""lenslab-eval reads a checkpoint's state file as data only, and any failure it did not plan
for is one line naming a crash log: never a traceback, never code from a checkpoint."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.analysis.conftest import lenslab_eval
from tests.workspace.conftest import run_train, write_run_file

# Each test launches lenslab-train on a trained run: seconds apiece, so not in the fast lane.
pytestmark = pytest.mark.slow


class Payload:
    """Unpickling this creates ``marker``: the proof that a state file ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def short_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run of the small test config (a few seconds of training)."""
    tmp = tmp_path_factory.mktemp("eval-safety")
    result = run_train(write_run_file(tmp / "run.toml", {"training_tokens": 10_240}), tmp / "runs")
    assert result.returncode == 0, result.stderr
    return tmp / "runs" / "t"


def test_state_file_whose_pickle_runs_code_is_refused(short_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "t"
    shutil.copytree(short_run, run)
    sae = tmp_path / "hostile-sae"
    shutil.copytree(run / "final", sae)
    marker = tmp_path / "PWNED"
    torch.save({"scaler": Payload(marker)}, sae / "lenslab_state.pt")

    result = lenslab_eval(str(run), "--sae", str(sae), "--tokens", "2048", "--features", "4")

    assert not marker.exists(), "lenslab-eval unpickled code from a checkpoint"
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"lenslab-eval: error: {sae}: ")
    assert "lenslab_state.pt holds something other than tensors" in lines[0]
    assert "Traceback" not in result.stderr
    assert not (run / "eval").exists() and not list(run.glob(".eval-tmp-*"))


def test_unexpected_error_is_one_line_naming_its_crash_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from lenslab_workspace.analysis import runs
    from lenslab_workspace.analysis.cli import main

    def broken(root: Path, explicit: Path | None) -> Path:
        raise ZeroDivisionError("a failure\nnobody planned for")

    monkeypatch.setattr(runs, "find_sae", broken)
    run = tmp_path / "t"
    run.mkdir()
    (run / "run-config.json").write_text("{}")

    code = main([str(run)])

    err = capsys.readouterr().err
    assert code == 1
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("lenslab-eval: error: unexpected ZeroDivisionError: a failure nobody planned for")
    crash = Path(lines[0].rsplit("traceback in ", 1)[1].rstrip(")"))
    assert crash.is_file() and "Traceback" in crash.read_text() and "ZeroDivisionError" in crash.read_text()
    assert [p.name for p in run.iterdir()] == ["run-config.json"]
