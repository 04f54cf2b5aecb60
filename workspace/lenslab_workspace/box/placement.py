"""One run per GPU: placing runs on a box's GPUs, and queueing them while every GPU is busy.

Everything lives on the persistent root, so it holds across the processes that place runs
(one supervisor per run on a box without Docker, one training container per run on a box with
an engine: containers share the root and its file locks, not their process ids):

    .lenslab/gpus/<uuid>.lock       a GPU's slot: whoever holds its lock (flock) uses that GPU
    .lenslab/gpu-queue/<ns>-<run>   a waiting run, held locked by its waiter; oldest first
    runs/<run>/gpu.json             where the run is: {"state": "queued"|"placed", ...}

A slot's lock is released by the kernel when its last holder exits, however it ends (finished,
failed, stopped, killed): a GPU can never stay taken by a run that is gone. The lock is passed
on to the trainer, so it stays held while the trainer lives. A waiter that died leaves a queue
entry nobody holds; the next waiter that meets it removes it. Only the head of the queue
claims a free GPU, so runs start in the order they were queued.

``gpu.json`` says where the current launch is; a reader trusts it only while that launch lives
(its ``pid`` is the live supervisor's, or its ``at`` is not older than the live container).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from lenslab.contract import EXIT_INTERRUPTED, EXIT_USAGE, GPU_FILE, is_run_name
from lenslab_workspace.box.gpus import Gpu, inventory
from lenslab_workspace.box.layout import BoxError, read_json, run_dir, state_dir, write_json

POLL_SECONDS = 0.5


@dataclass
class Placement:
    """A claimed GPU; its slot stays taken while ``handle`` (or a copy of its descriptor) is open."""

    gpu: Gpu
    handle: IO[str]

    def env(self) -> dict[str, str]:
        return {"CUDA_VISIBLE_DEVICES": self.gpu.uuid}

    def release(self) -> None:
        self.handle.close()


def slots_dir(root: Path) -> Path:
    return state_dir(root) / "gpus"


def queue_dir(root: Path) -> Path:
    return state_dir(root) / "gpu-queue"


def place(root: Path, name: str, gpus: list[Gpu], stopping: Callable[[], bool],
          on_queued: Callable[[], None] | None = None) -> Placement | None:  # fmt: skip
    """A GPU for run ``name``, once it heads the queue and a GPU is free (waiting as long as it
    takes); None when ``stopping()`` turned true first. Run ``name``'s ``gpu.json`` says which."""
    entry = _enqueue(root, name)
    queued = False
    try:
        while not stopping():
            placed = _claim(root, gpus) if _heads(root, entry[0]) else None
            if placed is not None:
                record(root, name, {"state": "placed", "index": placed.gpu.index, "uuid": placed.gpu.uuid,
                                    "name": placed.gpu.name})  # fmt: skip
                return placed
            if not queued:
                queued = True
                record(root, name, {"state": "queued", "queued_at": time.time()})
                if on_queued is not None:
                    on_queued()
            time.sleep(POLL_SECONDS)
        return None
    finally:
        _leave(entry)


def record(root: Path, name: str, fields: dict[str, Any]) -> None:
    write_json(run_dir(root, name) / GPU_FILE, {**fields, "at": time.time(), "pid": os.getpid()})


def forget(root: Path, name: str) -> None:
    with contextlib.suppress(OSError):
        (run_dir(root, name) / GPU_FILE).unlink()


def recorded(root: Path, name: str, pid: object) -> dict[str, Any] | None:
    """The run's ``gpu.json`` when process ``pid`` (its live supervisor) wrote it; else None."""
    data = read_json(run_dir(root, name) / GPU_FILE)
    if not isinstance(data, dict) or data.get("pid") != pid or data.get("state") not in ("queued", "placed"):
        return None
    return data


def resume_key(state: dict[str, Any]) -> tuple[bool, float]:
    """Where a supervised run goes when a restarted box starts its runs again: those that had a
    GPU first, then the queued ones by when they queued (``queued_at`` in its supervisor's
    state, kept from when it queued until it got a GPU)."""
    queued_at = state.get("queued_at")
    if isinstance(queued_at, bool) or not isinstance(queued_at, int | float):
        return False, 0.0
    return True, float(queued_at)


def _enqueue(root: Path, name: str) -> tuple[Path, IO[str]]:
    """This waiter's queue entry, locked before it gets its name: a prober never sees it unheld."""
    where = queue_dir(root)
    where.mkdir(parents=True, exist_ok=True)
    temp = where / f".new-{os.getpid()}-{time.time_ns()}"
    handle = open(temp, "a")  # noqa: SIM115 - held until the run leaves the queue
    fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
    entry = where / f"{time.time_ns():020d}-{name}"
    os.replace(temp, entry)
    return entry, handle


def _leave(entry: tuple[Path, IO[str]]) -> None:
    with contextlib.suppress(OSError):
        entry[0].unlink()
    entry[1].close()


def _heads(root: Path, mine: Path) -> bool:
    """Whether no live waiter queued before this one; entries of dead waiters are removed."""
    for path in sorted(queue_dir(root).iterdir()):
        if path == mine:
            return True
        if not path.name.startswith(".") and not _unheld(path):
            return False
    return True  # our own entry is gone (removed by hand): nobody queued before us is left


def _unheld(path: Path) -> bool:
    """Whether nobody holds ``path``'s lock (its waiter died), removing it then."""
    try:
        handle = open(path, "a")  # noqa: SIM115 - closed below
    except OSError:
        return True  # gone already
    with handle:
        if not _try_lock(handle):
            return False
        with contextlib.suppress(OSError):
            path.unlink()
        return True


def _claim(root: Path, gpus: list[Gpu]) -> Placement | None:
    """The first GPU whose slot nobody holds, now held by this process."""
    where = slots_dir(root)
    where.mkdir(parents=True, exist_ok=True)
    for gpu in gpus:
        handle = open(where / f"{gpu.uuid}.lock", "a")  # noqa: SIM115 - held while the run uses the GPU
        if _try_lock(handle):
            return Placement(gpu, handle)
        handle.close()
    return None


def _try_lock(handle: IO[str]) -> bool:
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise


def exec_placed(root: Path, name: str, command: list[str]) -> int:
    """``lenslab-box place NAME -- COMMAND``: a training container's command on a box with an
    engine. It takes a GPU (queued until one frees) and becomes COMMAND on it, the slot's lock
    inherited, so the trainer is the container's first process as before; a SIGTERM while
    queued (``lenslab stop``, ``docker stop``) leaves the queue with exit 75, as a stopped
    trainer does. Without GPUs it becomes COMMAND at once."""
    command = command[1:] if command[:1] == ["--"] else command
    if not is_run_name(name) or not command:
        raise BoxError(f"usage: lenslab-box place NAME -- COMMAND... (run name {name!r}, command {command!r})",
                       EXIT_USAGE)  # fmt: skip
    found = inventory()
    if found:
        stop = _StopFlag()
        placed = place(root, name, found, stop.is_set)
        if placed is None:
            forget(root, name)
            return EXIT_INTERRUPTED
        os.set_inheritable(placed.handle.fileno(), True)
        os.environ.update(placed.env())
    os.execvp(command[0], command)
    return 1  # not reached: execvp raises OSError when it cannot run COMMAND


class _StopFlag:
    """Set by SIGTERM, SIGINT or SIGHUP (exec gives COMMAND the default handlers back)."""

    def __init__(self) -> None:
        self.stopped = False
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._set)

    def _set(self, signum: int, frame: object) -> None:
        self.stopped = True

    def is_set(self) -> bool:
        return self.stopped
