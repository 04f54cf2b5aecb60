"""Detached training runs without Docker: one supervisor process per run.

``start`` spawns ``python -m lenslab_workspace.box supervise NAME RUN_FILE`` in its own session
(it outlives the SSH session that asked for it). The supervisor runs ``lenslab-train`` and
restarts it after a crash, at most ``MAX_RESTARTS`` times; finishing (0), being stopped (75)
and a bad run file (2) are not crashes. Its state lives in ``runs/<name>/supervisor.json``,
replaced atomically under a lock:

    desired         "running" or "stopped": a box that starts again (``serve``) restarts the
                    runs that are still meant to run
    supervisor_pid, trainer_pid, launched_at (when the current trainer started)
    trainer_start_ticks (the trainer's start time in /proc ticks: a pid alone may be reused)
    restarts, last_exit_code, phase ("queued", "running", "restarting", "exited")

On a box with GPUs the supervisor first takes a GPU of its own (box/placement.py), waiting in
the root's queue ("queued") while every GPU is busy; the trainer sees only that GPU
(``CUDA_VISIBLE_DEVICES``) and the GPU frees when the run ends, however it ends.

One run, one trainer: ``start`` and ``stop`` hold ``.start.lock`` from their check to the
supervisor's report (a stop during a start waits for it, then stops the run), and the
supervisor holds ``.run.lock`` for its life and passes it to each trainer, so a second
supervisor refuses while either lives. A trainer dies with its supervisor (SIGTERM: it
checkpoints); one left over all the same is found by its recorded pid and start time and
stopped before a new start.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import IO, Any

from lenslab.contract import (
    EXIT_FINISHED,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    RUNS_DIR,
    STOP_TIMEOUT_SECONDS,
    is_run_name,
)
from lenslab_workspace.box import gpus, placement
from lenslab_workspace.box.layout import (
    CONSOLE_FILE,
    SUPERVISE_MARKER,
    SUPERVISOR_FILE,
    BoxError,
    alive,
    locked,
    read_json,
    run_dir,
    start_ticks,
    stop_process,
    write_json,
)

MAX_RESTARTS = 5
NOT_CRASHES = (EXIT_FINISHED, EXIT_INTERRUPTED, EXIT_USAGE)
# The laptop's RunAlreadyRunning: a second start of a live run.
EXIT_ALREADY_RUNNING = 8
SPAWN_TIMEOUT_SECONDS = 15.0
_BACKOFF_SECONDS = (1, 2, 4, 8, 10)
RUN_LOCK = ".run.lock"
# How long a new supervisor waits for the run lock (a stopped trainer's children closing it).
RUN_LOCK_WAIT_SECONDS = 5.0
_PR_SET_PDEATHSIG = 1


def state_file(root: Path, name: str) -> Path:
    return run_dir(root, name) / SUPERVISOR_FILE


def read_state(root: Path, name: str) -> dict[str, Any]:
    data = read_json(state_file(root, name))
    return data if isinstance(data, dict) else {}


def update_state(root: Path, name: str, **changes: Any) -> dict[str, Any]:
    path = state_file(root, name)
    with locked(path):
        data = read_state(root, name)
        data.update(changes, updated_at=time.time())
        write_json(path, data)
    return data


def is_alive(state: dict[str, Any], name: str) -> bool:
    return alive(state.get("supervisor_pid"), SUPERVISE_MARKER) and _cmd_names(state.get("supervisor_pid"), name)


def _cmd_names(pid: object, name: str) -> bool:
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return name.encode() in args and b"supervise" in args


def check_name(name: str) -> None:
    if not is_run_name(name):
        raise BoxError(f"run name {name!r} is not valid: use 1-64 letters, digits, '.', '_' or '-'", EXIT_USAGE)


def start(root: Path, name: str, run_file: Path, *, resume: bool = False) -> dict[str, Any]:
    """Spawn the run's supervisor, detached; its state once the supervisor reported in."""
    check_name(name)
    if not run_file.is_file():
        raise BoxError(f"run file {run_file} does not exist; upload it first", EXIT_USAGE)
    named = _file_run_name(run_file)
    if named is not None and named != name:
        # lenslab-train keeps the run under the file's name: the supervisor would watch another run.
        raise BoxError(f"run file {run_file} names run {named!r}, not {name!r}; set name = {name!r} in it", EXIT_USAGE)
    run_dir(root, name).mkdir(parents=True, exist_ok=True)
    # From the check to the supervisor's report: a second start waits, then finds it alive.
    with _starting(root, name):
        state = read_state(root, name)
        if is_alive(state, name):
            raise BoxError(f"run {name} is already running", EXIT_ALREADY_RUNNING)
        if _stop_orphan(root, name, state):
            _say(root, name, "stopped the trainer its dead supervisor had left running")
        if not _run_lock_free(root, name):
            raise BoxError(f"run {name} is already running (a process holds its {RUN_LOCK})", EXIT_ALREADY_RUNNING)
        restarts = state.get("restarts", 0) if resume else 0
        restarts = restarts if isinstance(restarts, int) else 0
        update_state(root, name, run=name, run_file=str(run_file.resolve()), desired="running", supervisor_pid=None,
                     trainer_pid=None, restarts=restarts, phase="starting")  # fmt: skip
        return _spawn_supervisor(root, name, run_file)


def _starting(root: Path, name: str) -> Any:
    """The lock (``.start.lock``) that start and stop hold from their check to their end."""
    return locked(run_dir(root, name) / "start")


def _spawn_supervisor(root: Path, name: str, run_file: Path) -> dict[str, Any]:
    with _console(root, name) as console:
        child = subprocess.Popen(
            [sys.executable, "-m", SUPERVISE_MARKER, "--root", str(root), "supervise", name, str(run_file.resolve())],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=console,
            start_new_session=True,  # its own session: closing the SSH session sends it no SIGHUP
            close_fds=True,
        )
    deadline = time.monotonic() + SPAWN_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        state = read_state(root, name)
        if state.get("supervisor_pid") == child.pid:
            return state
        if child.poll() is not None:
            raise BoxError(f"the supervisor of run {name} exited at once ({child.returncode}); see {CONSOLE_FILE}")
        time.sleep(0.05)
    raise BoxError(f"the supervisor of run {name} did not report in within {SPAWN_TIMEOUT_SECONDS:.0f}s")


def _run_lock_free(root: Path, name: str) -> bool:
    """Whether no supervisor or trainer of the run holds its lock (waiting a little for one
    that was just stopped: its children close the lock as they exit)."""
    handle = _take_run_lock(root, name)
    if handle is None:
        return False
    handle.close()
    return True


def _take_run_lock(root: Path, name: str) -> IO[str] | None:
    """The run's lock, held while the returned file is open (in this process or a trainer)."""
    handle = open(run_dir(root, name) / RUN_LOCK, "a")  # noqa: SIM115 - it outlives this function
    deadline = time.monotonic() + RUN_LOCK_WAIT_SECONDS
    while True:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() > deadline:
                handle.close()
                return None
        time.sleep(0.1)


def _stop_orphan(root: Path, name: str, state: dict[str, Any]) -> bool:
    """Stop the recorded trainer when it still runs (its supervisor died); whether it ran."""
    pid, ticks = state.get("trainer_pid"), state.get("trainer_start_ticks")
    if ticks is None or start_ticks(pid) != ticks:
        return False
    stop_process(int(str(pid)), int(ticks), STOP_TIMEOUT_SECONDS)
    update_state(root, name, trainer_pid=None, phase="exited")
    return True


def _file_run_name(run_file: Path) -> object:
    """The ``name`` in the run file, or None when it has none or is no TOML (the trainer says so)."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised on 3.10 only
        import tomli as tomllib
    try:
        return tomllib.loads(run_file.read_text(encoding="utf-8")).get("name")
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None


def _console(root: Path, name: str) -> Any:
    return open(run_dir(root, name) / CONSOLE_FILE, "ab", buffering=0)


def trainer_command(root: Path, run_file: str) -> list[str]:
    """lenslab-train from PATH, else beside this Python (the image's venv)."""
    found = shutil.which("lenslab-train") or str(Path(sys.executable).with_name("lenslab-train"))
    return [found, run_file, "--runs-dir", str(root / RUNS_DIR)]


class Supervisor:
    """The loop of ``lenslab-box supervise``: launch, wait, decide, maybe launch again."""

    def __init__(self, root: Path, name: str, run_file: str) -> None:
        self.root, self.name, self.run_file = root, name, run_file
        self.trainer: subprocess.Popen[bytes] | None = None
        self.stopping = False
        self.lock: IO[str] | None = None
        self.placement: placement.Placement | None = None

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Whoever stops the supervisor (`lenslab-box stop`, the container stopping) wants a
        # checkpoint: the trainer gets SIGTERM and the loop ends once it exited.
        self.stopping = True
        if self.trainer is not None and self.trainer.poll() is None:
            self.trainer.send_signal(signal.SIGTERM)

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        self.lock = _take_run_lock(self.root, self.name)
        if self.lock is None:
            self._say(f"another supervisor or trainer of this run holds {RUN_LOCK}; not starting a second one")
            return EXIT_ALREADY_RUNNING
        state = update_state(self.root, self.name, supervisor_pid=os.getpid())
        restarts = int(state.get("restarts") or 0)
        if not self._place():  # stopped while it waited for a GPU
            update_state(self.root, self.name, phase="exited", trainer_pid=None)
            return 0
        while True:
            code = self._launch_and_wait()
            if code is None or self.stopping or code in NOT_CRASHES:
                break
            if restarts >= MAX_RESTARTS:
                self._say(f"trainer crashed (exit {code}) after {restarts} restarts; not restarting it")
                update_state(self.root, self.name, desired="stopped")
                break
            restarts += 1
            self._say(f"trainer crashed (exit {code}); restarting it ({restarts}/{MAX_RESTARTS})")
            update_state(self.root, self.name, restarts=restarts, phase="restarting")
            self._sleep(_BACKOFF_SECONDS[min(restarts, len(_BACKOFF_SECONDS)) - 1])
            if self.stopping:
                break
        if not self.stopping:
            # It finished, was refused, or someone else stopped the trainer: not meant to run on.
            update_state(self.root, self.name, desired="stopped")
        update_state(self.root, self.name, phase="exited", trainer_pid=None)
        self._unplace()
        return 0

    def _place(self) -> bool:
        """A GPU of its own when the box has GPUs, waiting in the queue while none is free;
        False when the run was stopped first. Without GPUs runs share the machine, as before."""
        found = gpus.inventory()
        if not found:
            return True
        self.placement = placement.place(self.root, self.name, found, lambda: self.stopping,
                                         lambda: self._queued(len(found)))  # fmt: skip
        if self.placement is None:
            placement.forget(self.root, self.name)
            return False
        gpu = self.placement.gpu
        update_state(self.root, self.name, queued_at=None)
        self._say(f"placed on GPU {gpu.index} ({gpu.name}, {gpu.uuid})")
        return True

    def _queued(self, count: int) -> None:
        update_state(self.root, self.name, phase="queued", queued_at=time.time())
        self._say(f"queued: all {count} GPU(s) are in use; it starts when one frees")

    def _unplace(self) -> None:
        if self.placement is not None:
            placement.forget(self.root, self.name)
            self.placement.release()
            self.placement = None

    def _spawn_if_desired(self) -> subprocess.Popen[bytes] | None:
        """The trainer, launched only while the run is still meant to run: ``desired`` is read
        and the trainer recorded under the state lock, so a stop is seen here or finds the trainer."""
        assert self.lock is not None
        path = state_file(self.root, self.name)
        die_with_me = _die_with_parent(os.getpid())
        with locked(path):
            state = read_state(self.root, self.name)
            if self.stopping or state.get("desired") != "running":
                return None
            # The GPU's slot goes with the trainer too: it stays taken while the trainer lives.
            fds: tuple[int, ...] = (self.lock.fileno(),)
            env: dict[str, str] | None = None
            if self.placement is not None:
                fds, env = (*fds, self.placement.handle.fileno()), {**os.environ, **self.placement.env()}
            with _console(self.root, self.name) as console:
                trainer = subprocess.Popen(
                    trainer_command(self.root, self.run_file), stdin=subprocess.DEVNULL, stdout=console,
                    stderr=console, pass_fds=fds, preexec_fn=die_with_me, env=env,
                )  # fmt: skip
            state.update(trainer_pid=trainer.pid, trainer_start_ticks=start_ticks(trainer.pid),
                         launched_at=time.time(), phase="running", updated_at=time.time())  # fmt: skip
            write_json(path, state)
        return trainer

    def _launch_and_wait(self) -> int | None:
        """The trainer's exit code, or None when the run is no longer meant to run."""
        self.trainer = self._spawn_if_desired()
        if self.trainer is None:
            return None
        if self.stopping:  # a signal that came before the trainer existed
            self.trainer.send_signal(signal.SIGTERM)
        deadline: float | None = None
        while True:
            try:
                code = self.trainer.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                pass
            if self.stopping:
                deadline = deadline or time.monotonic() + STOP_TIMEOUT_SECONDS
                if time.monotonic() > deadline:
                    self._say(f"trainer did not stop within {STOP_TIMEOUT_SECONDS}s; killing it")
                    self.trainer.kill()
        code = 128 - code if code < 0 else code  # killed by signal N: 128 + N, as a shell says
        update_state(self.root, self.name, last_exit_code=code, trainer_pid=None)
        return code

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < deadline:
            time.sleep(0.1)

    def _say(self, text: str) -> None:
        _say(self.root, self.name, text)


def _say(root: Path, name: str, text: str) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    with _console(root, name) as console:
        console.write(f"{stamp} SUPERVISOR {name}: {text}\n".encode())


def _die_with_parent(parent: int) -> Callable[[], None]:
    """A preexec for the trainer: SIGTERM (a checkpoint) when the supervisor dies, even by
    SIGKILL, so no trainer outlives it unwatched (Linux; elsewhere the recorded pid serves)."""
    try:
        prctl: Any = ctypes.CDLL(None, use_errno=True).prctl  # loaded before the fork
    except (OSError, AttributeError):
        prctl = None

    def preexec() -> None:
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # it died before the line above
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def stop(root: Path, name: str, timeout: float = STOP_TIMEOUT_SECONDS + 15) -> dict[str, Any]:
    """Stop the run gracefully and wait for its supervisor; what happened, for the laptop.
    A start under way is waited for (its lock), then stopped like any running run."""
    check_name(name)
    if not run_dir(root, name).is_dir():
        return {"run": name, "was_running": False, "exit_code": None}
    with _starting(root, name):
        state = read_state(root, name)
        if state:
            update_state(root, name, desired="stopped")
        if not is_alive(state, name):
            return {"run": name, "was_running": _stop_orphan(root, name, state), "exit_code": None}
        queued = state.get("phase") == "queued"
        os.kill(int(state["supervisor_pid"]), signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while is_alive(read_state(root, name), name):
            if time.monotonic() > deadline:
                raise BoxError(f"run {name} did not stop within {timeout:.0f}s")
            time.sleep(0.2)
    if queued:  # it left the queue: stopped on request before it started, as a trainer's 75 says
        return {"run": name, "was_running": True, "exit_code": EXIT_INTERRUPTED, "queued": True}
    return {"run": name, "was_running": True, "exit_code": read_state(root, name).get("last_exit_code")}


def signal_all(root: Path, sig: int = signal.SIGTERM) -> list[int]:
    """Send ``sig`` to every live supervisor (their desired state unchanged); their pids."""
    pids = []
    for name, state in states(root).items():
        if is_alive(state, name):
            pid = int(state["supervisor_pid"])
            os.kill(pid, sig)
            pids.append(pid)
    return pids


def states(root: Path) -> dict[str, dict[str, Any]]:
    found = {}
    for path in sorted((root / RUNS_DIR).glob(f"*/{SUPERVISOR_FILE}")):
        name = path.parent.name
        if is_run_name(name):
            found[name] = read_state(root, name)
    return found


def resume_desired(root: Path) -> list[str]:
    """Start again every run meant to run whose supervisor is gone (a restarted container)."""
    resumed = []
    # Runs that had a GPU first, then the queued ones in the order they queued: on a box with
    # GPUs each supervisor joins the queue as it starts, so this keeps their places.
    order = sorted(states(root).items(), key=lambda item: placement.resume_key(item[1]))
    for name, state in order:
        run_file = Path(str(state.get("run_file") or ""))
        if state.get("desired") == "running" and not is_alive(state, name) and run_file.is_file():
            try:
                start(root, name, run_file, resume=True)
            except BoxError as exc:  # one run that cannot start must not keep the box from serving
                _say(root, name, f"not resumed: {exc}")
                continue
            resumed.append(name)
    return resumed
