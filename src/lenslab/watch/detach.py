"""A watcher in the background: started detached, found by its pid file, stopped by a signal.

The detached watcher is ``lenslab --config <file> watch`` in a new session (it outlives the
terminal), logging to ``<state dir>/watch/<box>.log``. It takes the box's lock itself,
so two starts never make two watchers; ``--stop`` sends SIGTERM (the state file is always whole,
so it may die anywhere) and waits for the lock to be free.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from lenslab.errors import LenslabError
from lenslab.watch import state as states

START_SECONDS = 10.0
STOP_SECONDS = 20.0
# The child runs the same CLI with the same interpreter; argv after -c is its argv.
_CHILD = "import sys; from lenslab.cli import main; sys.exit(main(sys.argv[1:]))"


def start(box: str, config: Path, extra: list[str]) -> int:
    """Start the detached watcher; its pid once it holds the box's lock."""
    if states.is_locked(box):
        pid = states.read_pid(box)
        raise states.AlreadyWatching(
            f"a watcher for box {box} is already running{f' (pid {pid})' if pid else ''}",
            "stop it with `lenslab watch --stop` first",
        )
    log = states.log_path(box)
    log.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with log.open("ab") as out:
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD, "--config", str(config.resolve()), "watch", *extra],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise LenslabError(f"the watcher exited at once (exit {child.returncode})", f"see its log: {log}")
        if states.is_locked(box) and states.read_pid(box) == child.pid:
            return child.pid
        time.sleep(0.05)
    return child.pid


def stop(box: str) -> int | None:
    """Stop the box's watcher; its pid, or None when none was running."""
    if not states.is_locked(box):
        return None
    pid = states.read_pid(box)
    if pid is None:
        raise LenslabError(f"a watcher holds box {box}'s lock but wrote no pid", "stop it by hand")
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return None
    deadline = time.monotonic() + STOP_SECONDS
    while time.monotonic() < deadline and states.is_locked(box):
        time.sleep(0.1)
    if states.is_locked(box):
        raise LenslabError(f"the watcher (pid {pid}) did not stop within {STOP_SECONDS:.0f} s", f"kill {pid}")
    return pid
