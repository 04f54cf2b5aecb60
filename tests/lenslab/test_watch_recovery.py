"""What the watcher decides and restarts, with a fake clock and a fake provider API, and real
files: when an instance is given up as unreachable, how a run is restarted (as `lenslab train`
starts it: the box's mirror and its credentials), and what of a run found on the box is copied
to the laptop."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from labkit import tiny_run
from lenslab_testkit import NoRuns, lenslab

from lenslab import config, runfile
from lenslab.config import BoxConfig
from lenslab.contract import MIRROR_ENV_FILE
from lenslab.providers.offers import RUNNING, Instance
from lenslab.remote.bootstrap import LocalRunner
from lenslab.remote.training import Paths, upload
from lenslab.watch import events, runcopy
from lenslab.watch import state as states
from lenslab.watch.runs import LabRuns
from lenslab.watch.state import RECOVERING, WATCHING, WatchedRun, WatchState
from lenslab.watch.watcher import Watcher

URL = "s3://bucket/lenslab"
# Were the command to reach the provider at all, it would reach nothing but this machine.
OFFLINE = {
    "RUNPOD_API_KEY": "k",
    "RUNPOD_API_URL": "http://127.0.0.1:9/graphql",
    "RUNPOD_REST_URL": "http://127.0.0.1:9",
}


@pytest.fixture(autouse=True)
def no_xdg(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)


class FakeCloud:
    """The provider API as the watcher sees it: one instance the API reports RUNNING."""

    name = "runpod"
    capabilities = SimpleNamespace(stop_resume=False)

    def __init__(self) -> None:
        self.live: Instance | None = Instance("runpod", "p1", "lenslab-b", RUNNING, "RUNNING", True, "4090", 1, 0.3,
                                              "127.0.0.1", 2222)  # fmt: skip
        self.terminated: list[str] = []
        self.launches = 0

    def current(self, box: BoxConfig) -> Instance | None:
        return self.live

    def get(self, box: BoxConfig) -> Instance | None:
        return self.live

    def terminate(self, instance: Instance) -> None:
        self.terminated.append(instance.id)
        self.live = None

    def launch(self, box: BoxConfig) -> None:
        self.launches += 1


def watcher(tmp_path: Path, answers: list[bool], clock: list[float], **kw: Any) -> tuple[Watcher, FakeCloud]:
    cloud = FakeCloud()
    cfg = config.Config(box=BoxConfig(name="b", provider="runpod", budget_usd=100.0), path=tmp_path / "l.toml")
    w = Watcher(cfg, cloud, NoRuns(), say=lambda _: None, clock=lambda: clock[0], sleep=lambda _: None,  # type: ignore[arg-type]
                reachable=lambda host, port: answers.pop(0), poll_seconds=15.0, **kw)  # fmt: skip
    return w, cloud


def test_a_laptop_that_slept_does_not_give_up_a_running_instance(tmp_path: Path) -> None:
    clock = [1000.0]
    w, cloud = watcher(tmp_path, [True, False, True], clock)
    assert w.tick() == WATCHING
    clock[0] += 3600  # the laptop slept an hour; its first knock after waking fails
    assert w.tick() == WATCHING
    clock[0] += 15
    assert w.tick() == WATCHING  # the Wi-Fi is back: the box answers
    assert cloud.terminated == [] and cloud.launches == 0
    assert not [e for e in events.read("b") if e["kind"] == "preempted"]


def test_one_failed_knock_never_replaces_an_instance_the_api_calls_running(tmp_path: Path) -> None:
    clock = [1000.0]
    w, cloud = watcher(tmp_path, [True, False, False], clock, unreachable_seconds=0.0)
    w.tick()
    for _ in range(2):
        clock[0] += 15
        assert w.tick() == WATCHING
    assert cloud.terminated == [] and cloud.launches == 0


def test_a_box_unreachable_over_45_s_of_polling_is_replaced(tmp_path: Path) -> None:
    """Failed knocks 15 s apart: the first starts the clock, the one 45 s later gives it up; a
    sleep between two of them counts one poll at most."""
    clock = [1000.0]
    w, cloud = watcher(tmp_path, [True] + [False] * 5, clock)
    w.tick()
    clock[0] += 3600
    assert w.tick() == WATCHING  # 0 s seen
    clock[0] += 3600  # asleep again: counts as one poll (and its knock), 20 s
    assert w.tick() == WATCHING
    clock[0] += 15
    assert w.tick() == WATCHING  # 35 s seen
    clock[0] += 15
    assert w.tick() == RECOVERING  # 50 s seen, 4 knocks in a row
    assert cloud.terminated == ["p1"] and cloud.launches == 1
    (lost,) = [e for e in events.read("b") if e["kind"] == "preempted"]
    assert lost["state"].startswith("unreachable for 50 s, 4 knocks in a row")


# -- restarts: the very path `lenslab train` takes ------------------------------------------------


class DirLab:
    """A lab backend on this machine's files: `lenslab train`'s real upload into ``root``."""

    def __init__(self, root: Path) -> None:
        self.runner, self.lab, self.started = LocalRunner(), SimpleNamespace(root=str(root)), list[str]()

    def start_run(self, run: runfile.RunFile) -> str:
        upload(self.runner, run, Paths(self.lab.root, run.name))
        self.started.append(run.name)
        return f"proc-{run.name}"

    def wait_started(self, name: str, timeout: float) -> dict[str, Any]:
        return {"state": "running", "resumed_from_step": 7}

    def list_runs(self) -> list[dict[str, Any]]:
        return [{"name": p.name, "state": "running", "step": 3} for p in Path(self.lab.root, "runs-config").iterdir()]


def lab_runs(tmp_path: Path, lab: DirLab, said: list[str], **box: Any) -> LabRuns:
    cfg = config.Config(box=BoxConfig(name="b", provider="vast", budget_usd=10.0, **box), path=tmp_path / "l.toml")
    runs = LabRuns(cfg, say=said.append)

    @contextlib.contextmanager
    def opened() -> Iterator[DirLab]:
        yield lab

    runs._lab = opened  # type: ignore[assignment,method-assign]
    return runs


def test_a_restart_gets_the_box_mirror_and_its_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MIRROR_SECRET", "s3cr3t")
    run_file = tiny_run(tmp_path / "run", training_tokens=1000, checkpoint_every_tokens=100)
    lab, said = DirLab(tmp_path / "box"), list[str]()
    runs = lab_runs(tmp_path, lab, said, mirror=URL, mirror_env=["MIRROR_SECRET"])
    st = WatchState(box="b", provider="vast", runs=[WatchedRun("r", str(run_file))])
    assert runs.restart(st) == {"r": 7}
    config_dir = tmp_path / "box" / "runs-config" / "r"
    uploaded = runfile.load(config_dir / "run.toml", "r")
    from lenslab.runmirror import run_mirror

    assert run_mirror(uploaded) == URL  # the run file named no mirror: the box's is written in
    secrets = config_dir / MIRROR_ENV_FILE
    assert json.loads(secrets.read_text()) == {"MIRROR_SECRET": "s3cr3t"}
    assert secrets.stat().st_mode & 0o777 == 0o600


def box_with_run(tmp_path: Path) -> Path:
    """The box's runs-config/r as `lenslab train` left it, credentials included."""
    run_file = tiny_run(tmp_path / "src", training_tokens=1000, checkpoint_every_tokens=100)
    upload(LocalRunner(), runfile.load(run_file, "r"), Paths(str(tmp_path / "box"), "r"))
    config_dir = tmp_path / "box" / "runs-config" / "r"
    (config_dir / MIRROR_ENV_FILE).write_text('{"MIRROR_SECRET": "s3cr3t"}')
    (config_dir / "notes.txt").write_text("anything else the box holds")
    return config_dir


def test_a_run_found_on_the_box_copies_its_run_file_and_dataset_only(tmp_path: Path) -> None:
    box_with_run(tmp_path)
    lab, said = DirLab(tmp_path / "box"), list[str]()
    st = WatchState(box="b", provider="vast")
    assert lab_runs(tmp_path, lab, said).observe(st)
    (found,) = st.runs
    got, local = found.run_file, states.directory() / "b" / "runs-config" / "r"
    assert (found.name, found.step, got, said) == ("r", 3, str(local / "run.toml"), [])
    copied = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    assert copied == ["data/tiny-corpus.jsonl", "run.toml"]  # never the credentials
    assert all((local / p).stat().st_mode & 0o777 == 0o600 for p in copied)
    assert runfile.load(Path(got), "r").dataset == "data/tiny-corpus.jsonl"


@pytest.mark.parametrize(
    ("odd", "words"),
    [
        ("big", "run.toml is 2097152 bytes, more than the 1048576 a copy may hold"),
        ("two", "the box holds 2 run files for it"),
        ("broken", "its run file does not load"),
    ],
)
def test_anything_odd_on_the_box_is_refused_in_one_line(tmp_path: Path, odd: str, words: str) -> None:
    config_dir = box_with_run(tmp_path)
    if odd == "big":
        (config_dir / "run.toml").write_bytes(b"#" * (2 << 20))
    elif odd == "two":
        (config_dir / "other.toml").write_text('name = "x"\n')
    else:
        (config_dir / "run.toml").write_text('name = "r"\ndataset_path = 3\n')
    said: list[str] = []
    assert runcopy.copy_run_file(DirLab(tmp_path / "box"), "b", "r", said.append) == ""  # type: ignore[arg-type]
    (line,) = said
    assert words in line and line.startswith("run r found on the box is not restarted from there")
    local = states.directory() / "b" / "runs-config" / "r"
    assert not any(p.name.endswith(".lenslab-tmp") for p in local.rglob("*")) if local.exists() else True


def test_a_linked_run_file_on_the_box_is_not_followed(tmp_path: Path) -> None:
    config_dir = box_with_run(tmp_path)
    secret = tmp_path / "secret.toml"
    secret.write_text('name = "r"\n')
    (config_dir / "run.toml").unlink()
    os.symlink(secret, config_dir / "run.toml")
    assert runcopy.copy_run_file(DirLab(tmp_path / "box"), "b", "r", print) == ""  # type: ignore[arg-type]
    assert not (states.directory() / "b").exists()


# -- the command ----------------------------------------------------------------------------------


def test_watch_needs_a_budget(home: Path, tmp_path: Path) -> None:
    (tmp_path / "lenslab.toml").write_text('[box]\nname = "t"\nprovider = "runpod"\n')
    result = lenslab("watch", env={"LENSLAB_CONFIG": str(tmp_path / "lenslab.toml"), **OFFLINE})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "needs a cap on spending" in result.stderr and "set budget_usd" in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 2


def test_one_watcher_per_box_whatever_the_project(home: Path, tmp_path: Path) -> None:
    (tmp_path / "lenslab.toml").write_text(
        '[box]\nname = "t"\nprovider = "runpod"\nproject = "other"\nbudget_usd = 5\n'
    )
    held = states.take_lock("t")  # the watcher another project started for box t
    try:
        result = lenslab("watch", env={"LENSLAB_CONFIG": str(tmp_path / "lenslab.toml"), **OFFLINE})
    finally:
        held.close()
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "a watcher for box t is already running" in result.stderr
