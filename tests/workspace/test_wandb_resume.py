"""wandb logging that survives kills: one run, each step once, the same values as an uninterrupted run.

The runs log offline (no service needed); their transaction logs are read back with wandb's own
reader, ``wandb leet inspect --json``.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from lenslab_workspace.train.wandb_log import CHECKPOINT_FILE, ID_FILE

from .conftest import kill, read_status, run_train, start_train, train_in_process, wait_for, write_run_file

pytest.importorskip("wandb")

LOGGER = {
    "log_to_wandb": True,
    "wandb_log_frequency": 1,
    "eval_every_n_wandb_logs": 20,
    "wandb_project": "lenslab-test",
}


def wandb_env(tmp_path: Path, mode: str = "offline") -> dict[str, str]:
    """wandb's settings, cache and login kept inside the test's directory."""
    home = tmp_path / "wandb-home"
    home.mkdir(exist_ok=True)
    env = {
        "WANDB_MODE": mode,
        "WANDB_CONFIG_DIR": str(home / "config"),
        "WANDB_CACHE_DIR": str(home / "cache"),
        "WANDB_DATA_DIR": str(home / "data"),
        "WANDB_ARTIFACT_DIR": str(home / "artifacts"),
        "WANDB_API_KEY": "",
    }
    return env


def read_records(wandb_file: Path) -> list[dict[str, Any]]:
    # wandb's reader (the `wandb leet inspect --json` command, run without the CLI's start-up);
    # a file still being written, or cut short by a kill, is read up to where it ends.
    from wandb.util import get_core_path

    args = [get_core_path(), "leet", "inspect", "--no-observability", "--json", "--run-file", str(wandb_file)]
    out = subprocess.run([*args, str(wandb_file.parent.parent)], capture_output=True, text=True, timeout=120)
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def launch_files(run_dir: Path) -> list[Path]:
    """Each launch's transaction log, oldest first (wandb/latest-run only links to the newest)."""
    return sorted(p for p in (run_dir / "wandb").glob("*/run-*.wandb") if not p.parent.is_symlink())


def read_launch(path: Path) -> tuple[set[str], list[tuple[int, dict[str, Any]]]]:
    """The run ids and the history rows (step, logged values) of one launch."""
    ids: set[str] = set()
    rows: list[tuple[int, dict[str, Any]]] = []
    for record in read_records(path):
        if record["type"] == "run":
            ids.add(record["run"]["run_id"])
        elif record["type"] == "history":
            item = record["history"]["item"]
            rows.append((int(record["history"]["step"]["num"]), {k: v for k, v in item.items() if k[0] != "_"}))
    return ids, rows


def read_runs(run_dir: Path) -> tuple[set[str], list[tuple[int, dict[str, Any]]]]:
    """The run ids and every history row of all launches, in launch order."""
    files = launch_files(run_dir)
    assert files, f"no wandb transaction log under {run_dir / 'wandb'}"
    ids: set[str] = set()
    rows: list[tuple[int, dict[str, Any]]] = []
    for path in files:
        launch_ids, launch_rows = read_launch(path)
        ids |= launch_ids
        rows += launch_rows
    return ids, rows


def wait_until_wandb_has(proc: subprocess.Popen[str], run_dir: Path, known: list[Path], step: int) -> None:
    def written() -> bool:
        assert proc.poll() is None, f"trainer exited early ({proc.returncode})"
        new = [path for path in launch_files(run_dir) if path not in known]
        return bool(new) and any(s >= step for s, _ in read_launch(new[0])[1])

    wait_for(written, what=f"wandb to write step {step}")


# Checkpoints every 40 steps of 157; every step logged, histograms every 20.
CHANGES = {"logger": LOGGER, "training_tokens": 160_000, "resilience": {"checkpoint_every_tokens": 40_960}}


@pytest.mark.slow
def test_killed_twice_and_resumed_logs_each_step_once(tmp_path: Path) -> None:
    env = wandb_env(tmp_path)
    reference = tmp_path / "reference"
    reference.mkdir()
    done = run_train(write_run_file(reference / "run.toml", CHANGES), reference / "runs", env=env)
    assert done.returncode == 0, done.stderr
    ref_ids, ref_rows = read_runs(reference / "runs" / "t")
    expected = dict(ref_rows)
    assert len(ref_ids) == 1 and len(expected) == len(ref_rows) == 157

    run_file = write_run_file(tmp_path / "run.toml", CHANGES)
    runs, run_dir = tmp_path / "runs", tmp_path / "runs" / "t"
    # First kill: right after the checkpoint at step 40 commits. wandb loses what it was sent
    # but had not written yet, usually steps below 40: the next launch sends them from the checkpoint.
    proc = start_train(run_file, runs, env=env)
    wait_for(lambda: (run_dir / "checkpoints" / "step-000000040" / "manifest.json").exists(), what="checkpoint 40")
    kill(proc)
    # Second kill: once wandb has written step 86, past the checkpoint at step 80: the next
    # launch replays steps 80-86 and must not send them again.
    known = launch_files(run_dir)
    proc = start_train(run_file, runs, env=env)
    wait_until_wandb_has(proc, run_dir, known, 86)
    kill(proc)
    assert proc.returncode == -9
    result = run_train(run_file, runs, env=env)
    assert result.returncode == 0, result.stderr
    assert "resuming from step-000000080" in result.stderr

    files = launch_files(run_dir)
    assert len(files) == 3  # three launches of one run
    assert read_launch(files[2])[1][0][0] > 86  # the replayed steps wandb had were not sent again
    ids, rows = read_runs(run_dir)
    run_id = json.loads((run_dir / ID_FILE).read_text())["run_id"]
    assert ids == {run_id}
    for checkpoint in (run_dir / "checkpoints").glob("step-*"):
        assert json.loads((checkpoint / CHECKPOINT_FILE).read_text())["run_id"] == run_id
    steps = [step for step, _ in rows]
    assert [s for s, n in Counter(steps).items() if n > 1] == []  # no step twice
    assert sorted(steps) == sorted(expected)  # and none missing
    for step, values in rows:
        assert values == expected[step], f"step {step} differs from the uninterrupted run"


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
def test_unreachable_service_falls_back_to_offline(tmp_path: Path) -> None:
    env = {
        **wandb_env(tmp_path, mode="online"),
        "WANDB_BASE_URL": f"http://127.0.0.1:{closed_port()}",
        "WANDB_API_KEY": "x" * 40,
        "WANDB_INIT_TIMEOUT": "3",
    }
    run_file = write_run_file(tmp_path / "run.toml", {"logger": LOGGER, "training_tokens": 20_000})
    result = run_train(run_file, tmp_path / "runs", env=env)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "wandb: cannot start online" in line]
    assert len(warnings) == 1 and "logging offline" in warnings[0], result.stderr
    status = json.loads((tmp_path / "runs" / "t" / "status.json").read_text())
    assert status["state"] == "finished"
    ids, rows = read_runs(tmp_path / "runs" / "t")
    assert len(ids) == 1 and len(rows) == status["step"]


@pytest.mark.slow  # seconds of real processes: outside the fast lane
def test_no_api_key_trains_offline_with_one_warning(tmp_path: Path) -> None:
    env = wandb_env(tmp_path, mode="online")
    run_file = write_run_file(tmp_path / "run.toml", {"logger": LOGGER, "training_tokens": 8_192})
    result = run_train(run_file, tmp_path / "runs", env=env)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "wandb: cannot start online" in line]
    assert len(warnings) == 1, result.stderr
    assert sorted(step for _, rows in [read_runs(tmp_path / "runs" / "t")] for step, _ in rows) == list(range(8))


def test_missing_wandb_package_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # SAELens 6.54 itself imports wandb, so it is loaded first; then wandb is made unimportable,
    # as on a machine without it. The run file is refused before anything is written, in one
    # line that says how to install it.
    import sae_lens  # noqa: F401

    monkeypatch.setitem(sys.modules, "wandb", None)
    run_file = write_run_file(tmp_path / "run.toml", {"logger": LOGGER})
    code, err = train_in_process([str(run_file), "--runs-dir", str(tmp_path / "runs")], capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "'logger.log_to_wandb': the wandb package is not installed" in lines[0]
    assert "pip install 'lenslab-workspace[wandb]'" in lines[0]
    assert not (tmp_path / "runs" / "t").exists()


def test_every_logger_field_is_honoured_or_refused(tmp_path: Path) -> None:
    import dataclasses

    from sae_lens import LoggingConfig

    from lenslab_workspace.train.config import load_run_file
    from lenslab_workspace.train.errors import RunConfigError
    from lenslab_workspace.train.wandb_log import LOGGER_HONOURED, LOGGER_REFUSED

    names = {field.name for field in dataclasses.fields(LoggingConfig)}
    assert names == LOGGER_HONOURED.keys() | LOGGER_REFUSED.keys()
    assert not LOGGER_HONOURED.keys() & LOGGER_REFUSED.keys()
    for name, why in LOGGER_REFUSED.items():
        run_file = write_run_file(tmp_path / f"{name}.toml", {"logger": {name: True}})
        with pytest.raises(RunConfigError) as refused:
            load_run_file(run_file)
        assert str(refused.value) == f"{run_file}: field 'logger.{name}': {why}"


@pytest.mark.slow
def test_records_follow_saelens_schedule_and_names(tmp_path: Path) -> None:
    # SAETrainer.fit's schedule: train records when (step + 1) % wandb_log_frequency == 0, the
    # SAE's histograms when (step + 1) % (frequency * eval_every_n_wandb_logs) == 0, the sparsity
    # window at each multiple of feature_sampling_window.
    logger = {**LOGGER, "wandb_log_frequency": 3, "eval_every_n_wandb_logs": 2}
    logger |= {"run_name": "width-128", "wandb_id": "lenslab-t-1"}
    changes = {"logger": logger, "training_tokens": 20_480, "feature_sampling_window": 8}
    result = run_train(write_run_file(tmp_path / "run.toml", changes), tmp_path / "runs", env=wandb_env(tmp_path))
    assert result.returncode == 0, result.stderr
    (path,) = launch_files(tmp_path / "runs" / "t")
    records = read_records(path)
    (run,) = [r["run"] for r in records if r["type"] == "run"]
    assert (run["run_id"], run["display_name"], run["project"]) == ("lenslab-t-1", "width-128", "lenslab-test")
    rows = dict(read_launch(path)[1])
    assert sorted(rows) == [2, 5, 8, 11, 14, 16, 17]
    assert {s for s, v in rows.items() if "losses/overall_loss" in v} == {2, 5, 8, 11, 14, 17}
    assert {s for s, v in rows.items() if "weights/W_dec_norms._type" in v} == {5, 11, 17}
    assert {s for s, v in rows.items() if "metrics/mean_log10_feature_sparsity" in v} == {8, 16}
    assert [r for r in records if r["type"] == "artifact"]  # the final SAE, as SAELens logs it


@pytest.mark.slow
def test_run_restored_from_a_mirror_keeps_its_wandb_run(tmp_path: Path) -> None:
    env = wandb_env(tmp_path)
    run_file = write_run_file(tmp_path / "run.toml", {"logger": LOGGER, "resilience": {"mirror": str(tmp_path / "m")}})
    runs, run_dir = tmp_path / "runs", tmp_path / "runs" / "t"
    proc = start_train(run_file, runs, env=env)
    wait_for(lambda: (read_status(run_dir) or {}).get("step", 0) >= 45, what="step 45")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 75
    (old_file,) = launch_files(run_dir)
    old_ids, old_rows = read_launch(old_file)
    shutil.rmtree(run_dir)  # a new machine: only the mirror is left

    result = run_train(run_file, runs, env=env)
    assert result.returncode == 0, result.stderr
    assert "restored checkpoint step-" in result.stderr
    (new_file,) = launch_files(run_dir)
    new_ids, new_rows = read_launch(new_file)
    assert new_ids == old_ids == {json.loads((run_dir / ID_FILE).read_text())["run_id"]}
    # This machine's wandb has never seen the run: the checkpoint's records give it the steps
    # logged before the restore, so its history is whole, each step once.
    steps = [step for step, _ in new_rows]
    assert steps == list(range(len(steps))) and len(steps) == json.loads((run_dir / "status.json").read_text())["step"]
    new_values = dict(new_rows)
    assert all(new_values[step] == values for step, values in old_rows)
