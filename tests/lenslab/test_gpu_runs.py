"""Every GPU of a box used: `lenslab train` places runs one per GPU and queues the rest, and
`lenslab runs` shows which GPU each run uses; what the box says about it is checked first.

No GPU exists on the machines that run these tests: a stand-in `nvidia-smi` executable on the
box's PATH reports two GPUs in NVIDIA's CSV format, in place of the driver's own tool
(tests/workspace/test_box_gpus.py). The box is this machine, without Docker: real
`lenslab-box`, real supervisors, real `lenslab-train` processes on tiny runs; the laptop's
commands run in this process, reaching the box through ``LocalRunner`` (the runner lenslab's
local provider uses) where a remote box's lab would be reached over SSH.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from lenslab.remote.boxstate import clean_gpu, current_gpu, statuses
from lenslab.remote.processlab import parse_runs
from tests.workspace.test_box_gpus import INDEX, TWO_GPUS, UUID0, UUID1, environ, stand_in_smi
from tests.workspace.test_box_supervisor import BOX, status, tiny_run, wait_for

PLACED = {"state": "placed", "index": 1, "uuid": UUID1, "at": 5.0, "pid": 7}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (PLACED, {"state": "placed", "index": 1, "uuid": UUID1, "at": 5.0}),
        ({"state": "queued", "queued_at": 1.0, "at": 2.0}, {"state": "queued", "index": None, "uuid": None, "at": 2.0}),
        ({**PLACED, "uuid": "GPU-0\x1b[2J"}, {"state": "placed", "index": 1, "uuid": None, "at": 5.0}),
        ({**PLACED, "index": True}, None),
        ({**PLACED, "index": -1}, None),
        ({**PLACED, "index": 64}, None),
        ({**PLACED, "index": "0"}, None),
        ({**PLACED, "state": "running"}, None),
        ({**PLACED, "at": "soon"}, {"state": "placed", "index": 1, "uuid": UUID1, "at": None}),
        ([PLACED], None),
        (None, None),
    ],
    ids=["placed", "queued", "bad-uuid", "bool", "negative", "too-big", "text", "state", "bad-time", "list", "none"],
)
def test_what_the_box_says_of_a_gpu_is_checked(raw: object, expected: dict[str, Any] | None) -> None:
    assert clean_gpu(raw) == expected


def test_a_gpu_record_counts_only_for_the_live_launch_that_wrote_it() -> None:
    running = {"state": "running", "exit_code": None, "restarts": 0, "created": 5.0}
    assert current_gpu(PLACED, running) == clean_gpu(PLACED)
    assert current_gpu({**PLACED, "at": 4.0}, running) is None  # the previous launch's
    assert current_gpu(PLACED, {**running, "state": "exited"}) is None
    assert current_gpu(PLACED, None) is None
    live = {"alive": True, "phase": "queued", "restarts": 0, "launched_at": None}
    found = parse_runs([
        {"name": "a", "status": None, "supervisor": live, "gpu": {"state": "queued", "at": 1.0}},
        {"name": "b", "status": None, "supervisor": {**live, "alive": False}, "gpu": PLACED},
        {"name": "c", "status": None, "supervisor": live, "gpu": "GPU 0"},
        {"name": "d", "status": None, "supervisor": live},
    ])  # fmt: skip
    assert found["a"]["gpu"]["state"] == "queued" and found["a"]["state"] == "starting"
    assert [found[name]["gpu"] for name in "bcd"] == [None, None, None]


def test_the_docker_box_listing_reads_each_runs_gpu_record(tmp_path: Path) -> None:
    """`statuses` (a box with an engine) in one round trip: statuses and GPU records, real shell."""
    from lenslab.remote.bootstrap import LocalRunner

    runs = tmp_path / "runs"
    for name, files in {"a": ("status.json", "gpu.json"), "b": ("status.json",), "c": ("gpu.json",)}.items():
        (runs / name).mkdir(parents=True)
        if "status.json" in files:
            (runs / name / "status.json").write_text(json.dumps({"name": name, "state": "running", "step": 3}))
        if "gpu.json" in files:
            (runs / name / "gpu.json").write_text(json.dumps(PLACED))
    found = statuses(LocalRunner(), str(runs), "no-such-box")
    assert [(s["name"], s["step"], s["container"], s["gpu"]) for s in found] == [
        ("a", 3, None, None), ("b", 3, None, None),  # no container: no live launch to place
    ]  # fmt: skip


@contextmanager
def lab_here(root: Path) -> Iterator[Any]:
    from lenslab.remote.bootstrap import LocalRunner
    from lenslab.remote.lab import Lab
    from lenslab.remote.processlab import ProcessLab

    yield ProcessLab(LocalRunner(), Lab("g", str(root), "unused", True))


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    from lenslab.cli import main

    code = main(list(args))
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def table(text: str) -> dict[str, dict[str, str]]:
    """`lenslab runs`' table: run -> column -> cell (cells hold no double spaces)."""
    lines = text.splitlines()
    header = lines[0].split()
    rows = [re.split(r" {2,}", line.strip()) for line in lines[1:] if line.strip()]
    return {cells[0]: dict(zip(header, cells, strict=True)) for cells in rows}


def trainer_gpu(root: Path, run: str) -> str:
    """What the run's live trainer process was started with, read from the kernel."""
    pid = json.loads((root / "runs" / run / "supervisor.json").read_text())["trainer_pid"]
    return environ(pid)["CUDA_VISIBLE_DEVICES"]


def trainer_alive(root: Path, run: str) -> bool:
    state = json.loads((root / "runs" / run / "supervisor.json").read_text())
    return state.get("phase") == "running" and isinstance(state.get("trainer_pid"), int)


@pytest.fixture
def gpu_box(tmp_path: Path, project: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    root = tmp_path / "root"
    env = stand_in_smi(tmp_path / "bin", TWO_GPUS)
    monkeypatch.setenv("PATH", env["PATH"])
    (project / "lenslab.toml").write_text(f'[box]\nname = "g"\nprovider = "local"\nroot = "{root}"\n')
    monkeypatch.setattr("lenslab.remote.labs.open_lab", lambda cfg, attempts=3: lab_here(root))
    yield root
    for path in (root / "runs").glob("*/supervisor.json"):
        subprocess.run([BOX, "--root", str(root), "stop", path.parent.name], capture_output=True, timeout=200,
                       check=False)  # fmt: skip
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if str(tmp_path).encode() in (proc / "cmdline").read_bytes():
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ValueError):
            pass


@pytest.mark.slow
def test_three_runs_on_two_gpus_two_at_once_and_the_third_when_one_frees(
    gpu_box: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = gpu_box
    files = {
        name: tiny_run(tmp_path / name, name, training_tokens=tokens, checkpoint_every_tokens=40_000)
        for name, tokens in (("r1", 3_000_000), ("r2", 3_000_000), ("r3", 60_000), ("r4", 3_000_000))
    }
    for name in ("r1", "r2"):
        assert f"run {name} started on box g (supervised process" in cli(capsys, "train", str(files[name]))
        wait_for(f"{name}'s trainer", lambda: trainer_alive(root, name), timeout=60)  # noqa: B023
    seen = {name: trainer_gpu(root, name) for name in ("r1", "r2")}
    assert sorted(seen.values()) == sorted([UUID0, UUID1])  # two at once, each on its own GPU
    out = cli(capsys, "train", str(files["r3"]))
    assert "(supervised process" in out and "queued: every GPU of the box is in use; it starts when one frees" in out

    rows = table(cli(capsys, "runs"))
    assert [(rows[r]["STATE"], rows[r]["GPU"]) for r in ("r1", "r2", "r3")] == [
        ("running", str(INDEX[seen["r1"]])), ("running", str(INDEX[seen["r2"]])), ("queued", "queued"),
    ]  # fmt: skip
    listed = {run["name"]: run for run in json.loads(cli(capsys, "runs", "--json"))["runs"]}
    assert listed["r1"]["gpu"]["uuid"] == seen["r1"] and listed["r3"]["gpu"]["state"] == "queued"

    stopped = cli(capsys, "stop", "r1")  # a stopped run frees its GPU: the queued one starts there
    assert "run r1 stopped with a checkpoint" in stopped
    wait_for("r3's trainer", lambda: trainer_alive(root, "r3"), timeout=60)
    assert trainer_gpu(root, "r3") == seen["r1"]
    out = cli(capsys, "train", str(files["r4"]))  # r3 and r2 hold both GPUs
    assert "queued: every GPU" in out
    wait_for("r3 to finish", lambda: status(root, "r3").get("state") == "finished", timeout=300)
    wait_for("r4's trainer", lambda: trainer_alive(root, "r4"), timeout=60)
    assert trainer_gpu(root, "r4") == seen["r1"]  # the GPU r3 finished on
    rows = table(cli(capsys, "runs"))
    assert (rows["r3"]["STATE"], rows["r3"]["GPU"]) == ("finished", "-")
    assert rows["r4"]["GPU"] == str(INDEX[seen["r1"]]) and rows["r2"]["GPU"] == str(INDEX[seen["r2"]])
