"""`lenslab-box`'s supervisor on this machine, without SSH: real `lenslab-train` processes,
real signals, the real run directory.

A run is started detached and supervised; a second start is refused; a graceful stop leaves
a checkpoint and exit 75; a kill -9 of the trainer is a crash the supervisor restarts (and the
trainer resumes); the sixth crash in a row is not restarted.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "workspace" / "configs" / "tiny.toml"
BOX = str(Path(sys.executable).with_name("lenslab-box"))


def tiny_run(dest: Path, name: str, training_tokens: int, checkpoint_every_tokens: int) -> Path:
    text = re.sub(r"^name = .*$", f'name = "{name}"', TINY.read_text(), count=1, flags=re.M)
    text = re.sub(r"^training_tokens = .*$", f"training_tokens = {training_tokens}", text, flags=re.M)
    text = text.replace("[resilience]\n", f"[resilience]\ncheckpoint_every_tokens = {checkpoint_every_tokens}\n")
    text = re.sub(r"^checkpoint_every_seconds = .*$", "checkpoint_every_seconds = 3600", text, flags=re.M)
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(TINY.parent / "data", dest / "data", dirs_exist_ok=True)
    path = dest / "run.toml"
    path.write_text(text)
    return path


def box(
    root: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 200
) -> subprocess.CompletedProcess[str]:
    return subprocess.run([BOX, "--root", str(root), *args], capture_output=True, text=True, timeout=timeout,
                          env=env, check=False)  # fmt: skip


def wait_for(what: str, check: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def supervisor(root: Path, run: str) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads((root / "runs" / run / "supervisor.json").read_text())
        return data
    except (OSError, ValueError):
        return {}


def status(root: Path, run: str) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads((root / "runs" / run / "status.json").read_text())
        return data
    except (OSError, ValueError):
        return {}


def listed(root: Path, run: str) -> dict[str, Any]:
    out = box(root, "runs", "--json")
    assert out.returncode == 0, out.stderr
    entries = {entry["name"]: entry for entry in json.loads(out.stdout)}
    return dict(entries.get(run) or {})


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "root"


@pytest.fixture(autouse=True)
def stop_leftovers(root: Path) -> Any:
    yield
    for path in (root / "runs").glob("*/supervisor.json"):
        subprocess.run(
            [BOX, "--root", str(root), "stop", path.parent.name], capture_output=True, timeout=200, check=False
        )


@pytest.mark.slow
def test_stop_checkpoints_and_a_new_start_resumes(root: Path, tmp_path: Path) -> None:
    run_file = tiny_run(tmp_path / "cfg", "r1", training_tokens=300_000, checkpoint_every_tokens=40_000)
    started = box(root, "start", "r1", str(run_file))
    assert started.returncode == 0, started.stderr
    pid = json.loads(started.stdout)["supervisor_pid"]
    assert isinstance(pid, int) and supervisor(root, "r1")["desired"] == "running"

    again = box(root, "start", "r1", str(run_file))
    assert (again.returncode, again.stdout) == (8, "")
    assert again.stderr == "lenslab-box: error: run r1 is already running\n"

    wait_for("a first checkpoint", lambda: status(root, "r1").get("last_checkpoint"), timeout=300)
    entry = listed(root, "r1")
    assert entry["supervisor"]["alive"] is True and entry["supervisor"]["restarts"] == 0
    assert entry["status"]["state"] == "running"

    stopped = box(root, "stop", "r1")
    assert stopped.returncode == 0, stopped.stderr
    assert json.loads(stopped.stdout) == {"run": "r1", "was_running": True, "exit_code": 75}
    assert status(root, "r1")["state"] == "interrupted"
    state = supervisor(root, "r1")
    assert state["desired"] == "stopped" and state["last_exit_code"] == 75 and state["restarts"] == 0
    assert listed(root, "r1")["supervisor"]["alive"] is False
    assert json.loads(box(root, "stop", "r1").stdout)["was_running"] is False

    assert box(root, "start", "r1", str(run_file)).returncode == 0
    log = root / "runs" / "r1" / "train.log"
    wait_for("the resume", lambda: "resuming from step-" in log.read_text(), timeout=300)
    console = box(root, "logs", "r1")
    assert console.returncode == 0 and "resuming from step-" in console.stdout


@pytest.mark.slow
def test_a_killed_trainer_is_restarted_and_resumes(root: Path, tmp_path: Path) -> None:
    run_file = tiny_run(tmp_path / "cfg", "r2", training_tokens=300_000, checkpoint_every_tokens=40_000)
    assert box(root, "start", "r2", str(run_file)).returncode == 0
    wait_for("a first checkpoint", lambda: status(root, "r2").get("last_checkpoint"), timeout=300)
    trainer = supervisor(root, "r2")["trainer_pid"]
    os.kill(trainer, signal.SIGKILL)
    wait_for("the restart", lambda: supervisor(root, "r2").get("restarts") == 1, timeout=60)
    log = root / "runs" / "r2" / "train.log"
    wait_for("the resume", lambda: "resuming from step-" in log.read_text(), timeout=300)
    state = supervisor(root, "r2")
    assert state["trainer_pid"] != trainer and state["desired"] == "running"
    assert "trainer crashed (exit 137); restarting it (1/5)" in (root / "runs" / "r2" / "console.log").read_text()


@pytest.mark.slow
def test_the_sixth_crash_in_a_row_is_not_restarted(root: Path, tmp_path: Path) -> None:
    """A trainer that fails every time (exit 1, a failure during training): 5 restarts, then none."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    launches = tmp_path / "launches"
    crashing = bin_dir / "lenslab-train"
    crashing.write_text(f"#!/bin/sh\necho launch >> {launches}\necho 'out of memory' >&2\nexit 1\n")
    crashing.chmod(0o755)
    run_file = tiny_run(tmp_path / "cfg", "r3", training_tokens=20_000, checkpoint_every_tokens=10_000)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    assert box(root, "start", "r3", str(run_file), env=env).returncode == 0
    wait_for("the supervisor to give up", lambda: not listed(root, "r3")["supervisor"]["alive"], timeout=120)
    assert launches.read_text().count("launch") == 6
    state = supervisor(root, "r3")
    assert state["restarts"] == 5 and state["last_exit_code"] == 1 and state["desired"] == "stopped"
    console = (root / "runs" / "r3" / "console.log").read_text()
    assert "trainer crashed (exit 1) after 5 restarts; not restarting it" in console


def test_a_finished_or_refused_run_is_not_restarted(root: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "r4"\nno_such_field = 1\n')
    assert box(root, "start", "r4", str(bad)).returncode == 0
    wait_for("the supervisor to exit", lambda: supervisor(root, "r4").get("phase") == "exited", timeout=120)
    state = supervisor(root, "r4")
    assert state["last_exit_code"] == 2 and state["restarts"] == 0 and state["desired"] == "stopped"
    assert "lenslab-train: error:" in (root / "runs" / "r4" / "console.log").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["start", "../x", "run.toml"], "lenslab-box: error: run name '../x' is not valid"),
        (["start", "ok", "missing.toml"], "lenslab-box: error: run file missing.toml does not exist"),
        (["stop", "-bad"], "lenslab-box: error: run name '-bad' is not valid"),
        (["logs", "nothing"], "lenslab-box: error: run nothing has no log on this box"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(root: Path, args: list[str], message: str) -> None:
    out = box(root, *([*args[:1], "--", *args[1:]] if args[1].startswith("-") else args))
    assert out.returncode in (2, 3) and out.stdout == ""
    assert out.stderr.startswith(message) and out.stderr.count("\n") == 1, out.stderr
    assert not (root / "runs").exists() or not any((root / "runs").iterdir())


def test_facts_and_version() -> None:
    version = subprocess.run([BOX, "--version"], capture_output=True, text=True, check=True)
    assert re.fullmatch(r"lenslab-box \d+\.\d+\.\d+\n", version.stdout)


def test_prepare_and_facts_have_the_shapes_the_laptop_checks(root: Path) -> None:
    from lenslab.remote.bootstrap import check_status_facts, summary_problem

    prepared = box(root, "prepare", "--json")
    assert prepared.returncode == 0, prepared.stderr
    summary = json.loads(prepared.stdout)
    assert summary_problem(summary) is None and summary["root"] == str(root) and summary["docker"] == "none"
    assert all((root / sub).is_dir() for sub in ("workspace", "checkpoints", "hf-cache", "runs"))
    again = json.loads(box(root, "prepare", "--json").stdout)
    assert again["changed"] == []
    facts = check_status_facts(json.loads(box(root, "facts", "--json").stdout), "lenslab-box facts")
    assert facts["root_exists"] is True and facts["containers"] == 0 and facts["disk_free_kb"] > 0
