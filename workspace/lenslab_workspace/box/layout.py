"""Where things live under the persistent root, and the small file operations every command shares."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lenslab.contract import RUNS_DIR

DEFAULT_ROOT = "/lab"
LAYOUT = ("workspace", "checkpoints", "hf-cache", RUNS_DIR)
STATE_DIR = ".lenslab"
SUPERVISOR_FILE = "supervisor.json"
# What the trainer prints (stdout and stderr of every launch) and what the supervisor says
# about it; the trainer's own train.log holds its log lines once, so they are not copied there.
CONSOLE_FILE = "console.log"
# The marker in a supervisor's command line: a pid only counts as a run's supervisor with it.
SUPERVISE_MARKER = "lenslab_workspace.box"


class BoxError(Exception):
    """One line for stderr and the exit code to leave with."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def resolve_root(arg: str | None) -> Path:
    return Path(arg or os.environ.get("LENSLAB_ROOT") or DEFAULT_ROOT).expanduser()


def state_dir(root: Path) -> Path:
    return root / STATE_DIR


def run_dir(root: Path, name: str) -> Path:
    return root / RUNS_DIR / name


def prepare(root: Path) -> list[str]:
    """The root's layout; what had to be created."""
    made = []
    for sub in ("", *LAYOUT, STATE_DIR):
        path = root / sub
        if not path.is_dir():
            path.mkdir(parents=True, exist_ok=True)
            made.append(f"created {path}")
    return made


def write_json(path: Path, data: Any, mode: int = 0o644) -> None:
    """Replace ``path`` atomically: a reader sees the old file or the new one, never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(data, out)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_json(path: Path, limit: int = 1 << 16) -> Any:
    """The file's JSON, or None when it is missing, too big or not JSON."""
    try:
        with path.open("rb") as src:
            return json.loads(src.read(limit))
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock beside ``path`` for a read-modify-write of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def alive(pid: object, marker: str) -> bool:
    """Whether ``pid`` runs and its command line holds ``marker`` (a pid from an older boot of
    the box, or of a container, may since belong to anything); a zombie is not alive."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat.rsplit(")", 1)[-1].split()[:1] == ["Z"]:
        return False
    return marker.encode() in cmdline


def start_ticks(pid: object) -> int | None:
    """When process ``pid`` started (clock ticks since boot), None when it is gone or a zombie."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[:1] == ["Z"] or len(fields) < 20 or not fields[19].isdigit():
        return None
    return int(fields[19])


def stop_process(pid: int, ticks: int, timeout: float) -> None:
    """SIGTERM (it checkpoints), then SIGKILL after ``timeout``; the same process only."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while start_ticks(pid) == ticks:
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        else:
            return
