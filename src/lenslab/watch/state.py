"""What a watcher remembers, on the laptop, so one killed at any moment picks up where it was.

``<state dir>/watch/<box>.json`` (written atomically: a reader or a restarted watcher never sees
half a file) holds the phase, the instance being watched, when it was preempted, the runs to
keep going (with the local copy of each run file) and their last known steps. Every action that
spends is written down *before* it is taken, and every launch is found again by the instance's
name (``lenslab-<box>``), so a watcher killed between the two launches nothing twice.

``<state dir>/watch/<box>.lock`` is held (``flock``) by the one watcher of a box (whatever
project names it) for as long as it lives; ``<box>.pid`` names it for ``lenslab watch --stop``;
``<box>.log`` is a detached watcher's log.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from lenslab import files
from lenslab.errors import LenslabError
from lenslab.watch.events import state_dir

WATCHING = "watching"  # the instance is up (or being waited for at first)
RECOVERING = "recovering"  # preempted: resuming it or launching another
BUDGET = "budget"  # budget_usd reached: nothing more is launched
FINISHED = "finished"  # every watched run finished


@dataclass
class WatchedRun:
    name: str
    run_file: str  # a local copy of the run file (what `lenslab train` takes), "" when unknown
    step: int | None = None  # the newest step seen while it ran
    finished: bool = False


@dataclass
class WatchState:
    box: str
    provider: str
    phase: str = WATCHING
    instance: str = ""  # the provider's id of the instance watched
    preempted_at: float | None = None  # epoch seconds, while RECOVERING
    preempted_state: str = ""  # what was seen: preempted, stopped, terminated, unreachable
    last_reachable: float | None = None
    failed_knocks: int = 0  # SSH knocks failed in a row
    unreachable_for: float = 0.0  # seconds of polling those knocks spanned (a sleep not counted)
    last_knock: float | None = None  # when the last failed knock was
    resume_asked_at: float | None = None
    recoveries: int = 0
    restart_pending: bool = False  # back after a preemption: the runs are still to be restarted
    runs: list[WatchedRun] = field(default_factory=list)

    def run(self, name: str) -> WatchedRun | None:
        return next((r for r in self.runs if r.name == name), None)

    def unfinished(self) -> list[WatchedRun]:
        return [r for r in self.runs if not r.finished]

    def steps(self) -> dict[str, int]:
        return {r.name: r.step for r in self.unfinished() if r.step is not None}


def directory() -> Path:
    return state_dir() / "watch"


def path(box: str) -> Path:
    return directory() / f"{box}.json"


def load(box: str, provider: str) -> WatchState:
    """The box's state, or a fresh one; a file that cannot be read as one starts afresh (the
    instance is found again by name, so nothing is launched twice for it)."""
    try:
        raw = json.loads(path(box).read_text())
        runs = [WatchedRun(**r) for r in raw.pop("runs", [])]
        state = WatchState(**raw, runs=runs)
    except (OSError, ValueError, TypeError):
        return WatchState(box=box, provider=provider)
    state.provider = provider
    return state


def save(state: WatchState) -> None:
    directory().mkdir(mode=0o700, parents=True, exist_ok=True)
    files.write_atomic(path(state.box), json.dumps(asdict(state), indent=1, sort_keys=True), 0o600)


def lock_path(box: str) -> Path:
    return directory() / f"{box}.lock"


def pid_path(box: str) -> Path:
    return directory() / f"{box}.pid"


def log_path(box: str) -> Path:
    return directory() / f"{box}.log"


class AlreadyWatching(LenslabError):
    pass


def take_lock(box: str) -> IO[Any]:
    """Hold the box's watcher lock for the life of this process (one watcher per box, whatever
    project names it); the lock is the kernel's, so a watcher killed with SIGKILL leaves it free."""
    directory().mkdir(mode=0o700, parents=True, exist_ok=True)
    handle = lock_path(box).open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        pid = read_pid(box)
        raise AlreadyWatching(
            f"a watcher for box {box} is already running{f' (pid {pid})' if pid else ''}",
            "see its log with `lenslab watch --log`, or stop it with `lenslab watch --stop`",
        ) from None
    files.write_atomic(pid_path(box), f"{os.getpid()}\n", 0o600)
    return handle


def is_locked(box: str) -> bool:
    try:
        with lock_path(box).open("a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(handle, fcntl.LOCK_UN)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    return False


def read_pid(box: str) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(pid_path(box).read_text().strip())
    return None
