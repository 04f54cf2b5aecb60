"""The lab on a box without a Docker engine: ``lenslab-box`` on the box, spoken over the runner.

Runs are supervised processes there (restarted after a crash, at most 5 times; stopped with
SIGTERM and a checkpoint), Jupyter is a process on the box's loopback interface, and the box's
facts come from ``lenslab-box facts``. Everything the box prints is checked before use, as
``boxstate`` checks the Docker box's answers: run names by the contract, statuses field by
field, the supervisor's facts by type.
"""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lenslab.contract import EXIT_FINISHED, LOG_FILE, is_run_name
from lenslab.errors import BootstrapError, CommandFailed, GPURequired, LenslabError, RemoteError
from lenslab.remote.boxstate import LOG_TAIL_LINES, clean_gpu, clean_status, is_queued, text
from lenslab.remote.lab import Lab
from lenslab.remote.training import (
    POLL_SECONDS,
    STARTED_STATES,
    Paths,
    RunAlreadyRunning,
    RunDidNotStart,
    upload,
)

if TYPE_CHECKING:
    from lenslab.config import BoxConfig
    from lenslab.remote.bootstrap import Runner
    from lenslab.remote.follow import Follower
    from lenslab.runfile import RunFile

BOX_COMMAND = "lenslab-box"
CONSOLE_FILE = "console.log"
MISSING_FIX = (
    "run lenslab's image on the box with `lenslab-box serve` as its start command, "
    "or `pip install lenslab-workspace` there so that lenslab-box is on PATH"
)
MAX_REPLY_BYTES = 1 << 22


class BoxCommandFailed(CommandFailed):
    """``lenslab-box`` answered with an error (its one line is the message)."""


def box_command(root: str, *args: str, box: str = BOX_COMMAND) -> str:
    return shlex.join([box, "--root", root, *args])


def check_version(runner: Runner) -> str:
    """``lenslab-box --version``; one line saying what to do when the box has none."""
    result = runner.run(f"{BOX_COMMAND} --version")
    answer = result.stdout.strip()
    if result.exit_status != 0 or not answer.startswith(f"{BOX_COMMAND} "):
        raise LenslabError(f"the box has no working {BOX_COMMAND} (exit {result.exit_status})", MISSING_FIX)
    return text(answer.removeprefix(f"{BOX_COMMAND} "), 40)


def ask(runner: Runner, root: str, *args: str, box: str = BOX_COMMAND) -> Any:
    """Run ``lenslab-box ARGS`` (``box``: where it is, when not on PATH) and return its JSON
    answer; its error line as an exception."""
    result = runner.run(box_command(root, *args, box=box))
    if result.exit_status != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        line = text(lines[-1] if lines else f"exit {result.exit_status}").removeprefix("lenslab-box: error: ")
        if result.exit_status == 127:
            raise LenslabError(f"the box has no {BOX_COMMAND}", MISSING_FIX)
        raise BoxCommandFailed(f"{BOX_COMMAND} {args[0]} failed on the box: {line}", result.exit_status)
    try:
        return json.loads(result.stdout[:MAX_REPLY_BYTES])
    except (ValueError, RecursionError):  # deeply nested JSON raises RecursionError, not ValueError
        raise RemoteError(f"{BOX_COMMAND} {args[0]} printed no JSON: {text(result.stdout, 120)!r}") from None


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and abs(value) < 1 << 62 else None


def _float(value: object) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and abs(value) < 1e15
    return float(value) if ok else None  # type: ignore[arg-type]


def supervisor_facts(raw: object) -> dict[str, Any] | None:
    """The supervisor's facts in the shape ``boxstate`` gives a container's: state, exit_code,
    restarts, created (when the current trainer was launched), so `runs` reads both alike."""
    if not isinstance(raw, dict):
        return None
    alive = raw.get("alive") is True
    phase = raw.get("phase")
    state = ("restarting" if phase == "restarting" else "running") if alive else "exited"
    launched = _float(raw.get("launched_at"))
    return {
        "state": state,
        "exit_code": _int(raw.get("last_exit_code")),
        "restarts": max(_int(raw.get("restarts")) or 0, 0),  # a negative count is no count
        "created": launched or 0.0,
        "launched": launched is not None,
    }


def parse_runs(raw: object) -> dict[str, dict[str, Any]]:
    """``lenslab-box runs``' answer, checked: run name -> status with its ``container`` facts
    and its ``gpu`` (None on a box without GPUs, or when its supervisor is gone)."""
    found: dict[str, dict[str, Any]] = {}
    for item in raw if isinstance(raw, list) else []:
        name = item.get("name") if isinstance(item, dict) else None
        if not isinstance(name, str) or not is_run_name(name) or name in found:
            continue
        status = clean_status(item.get("status"), name)
        facts = supervisor_facts(item.get("supervisor"))
        if status is None and facts is None:
            continue
        status = status or {"name": name, "state": "starting", "last_checkpoint": None}
        status["container"] = facts
        live = facts is not None and facts["state"] != "exited"
        status["gpu"] = clean_gpu(item.get("gpu")) if live else None
        found[name] = status
    return found


@dataclass
class ProcessLab:
    """The lab backend of a box without Docker (see ``lenslab.remote.labs.LabBackend``)."""

    runner: Runner
    lab: Lab
    jupyter_port: int = 8888

    def _ask(self, *args: str) -> Any:
        return ask(self.runner, self.lab.root, *args)

    def start_run(self, run: RunFile) -> str:
        paths = Paths(self.lab.root, run.name)
        upload(self.runner, run, paths)
        try:
            answer = self._ask("start", run.name, f"{paths.config_dir}/{run.path.name}")
        except BoxCommandFailed as exc:
            if exc.exit_status == RunAlreadyRunning.exit_code:
                raise _already_running(run.name, self.lab.box) from None
            raise
        pid = _int(answer.get("supervisor_pid")) if isinstance(answer, dict) else None
        return f"supervised process {pid}"

    def list_runs(self) -> list[dict[str, Any]]:
        found = parse_runs(self._ask("runs", "--json"))
        return [found[name] for name in sorted(found)]

    def wait_started(self, name: str, timeout: float) -> dict[str, Any]:
        """As the Docker box's: the first status this launch's trainer wrote, or why none came."""
        deadline = time.monotonic() + timeout
        while True:
            status = parse_runs(self._ask("runs", "--json")).get(name)
            facts = status.get("container") if status else None
            if status is None or facts is None:
                raise self._not_started(name, "its supervisor is gone")
            if is_queued(status):  # every GPU is busy: the box starts it when one frees
                return {"name": name, "state": "queued", "gpu": status["gpu"], "resumed_from_step": None}
            if facts["launched"] and (status.get("started_at") or 0.0) >= facts["created"]:
                if status.get("state") in STARTED_STATES:
                    return status
                self.stop_run(name)  # a failed start would only fail again
                why = f"the trainer stopped as it started ({status['state']}: {status.get('message') or 'no message'})"
                raise self._not_started(name, why)
            if facts["state"] == "exited" and facts["exit_code"] == EXIT_FINISHED and status["state"] == "finished":
                return status  # an already finished run: the trainer said so and exited at once
            if facts["restarts"] or facts["state"] == "exited":
                what = f"exited with code {facts['exit_code']}"
                if facts["restarts"]:
                    what = f"crashed (exit code {facts['exit_code']}, restarted {facts['restarts']}x)"
                self.stop_run(name)  # a crash before any status repeats itself
                raise self._not_started(name, f"its trainer {what} before it wrote its status")
            if time.monotonic() >= deadline:
                why = f"the trainer wrote no status within {timeout:.0f}s (it is still running)"
                raise self._not_started(name, why)
            time.sleep(POLL_SECONDS)

    def _not_started(self, name: str, why: str) -> RunDidNotStart:
        run_dir = Paths(self.lab.root, name).run_dir
        out = self.runner.run(f"tail -n {LOG_TAIL_LINES} {shlex.quote(f'{run_dir}/{CONSOLE_FILE}')} 2>/dev/null")
        tail = [text(line) for line in out.stdout.splitlines() if line.strip()][-LOG_TAIL_LINES:]
        return RunDidNotStart(
            f"run {name} did not start: {why}",
            f"see `lenslab logs {name}`; fix the cause, then run `lenslab train` again",
            tail,
        )

    def stop_run(self, name: str) -> int | None:
        answer = self._ask("stop", name)
        if not isinstance(answer, dict) or answer.get("was_running") is not True:
            return None
        code = _int(answer.get("exit_code"))
        return -1 if code is None else code

    def stop_all(self) -> list[str]:
        """Stop every live run gracefully (`lenslab down`); their names."""
        stopped = []
        for status in self.list_runs():
            facts = status.get("container")
            if facts is not None and facts["state"] != "exited" and self.stop_run(status["name"]) is not None:
                stopped.append(status["name"])
        return stopped

    def stream_log(self, follower: Follower, follow: bool) -> bool:
        """Print the run's console log from the byte the follower got to; False: it ended."""
        from lenslab.remote.follow import stream_command

        name = follower.name
        if follower.offset == 0:
            run_dir = shlex.quote(Paths(self.lab.root, name).run_dir)
            found = self.runner.run(f"test -f {run_dir}/{CONSOLE_FILE} || test -f {run_dir}/{LOG_FILE}")
            if found.exit_status != 0:
                raise LenslabError(f"run {name} has no log on the box", "see the runs with `lenslab runs`")
        args = ["logs", name, "--offset", str(follower.offset), *(["--follow"] if follow else [])]

        def sink(chunk: bytes) -> None:
            follower.offset += len(chunk)
            follower.out.write(chunk)
            follower.out.flush()

        stream_command(self.runner, box_command(self.lab.root, *args) + " 2>/dev/null", sink)
        return False

    def jupyter_access(self) -> tuple[int, str]:
        return jupyter_answer(self._ask("jupyter", "--json", "--port", str(self.jupyter_port)))


def jupyter_answer(answer: Any) -> tuple[int, str]:
    """``lenslab-box jupyter``'s port and token, checked."""
    port = _int(answer.get("port")) if isinstance(answer, dict) else None
    token = answer.get("token") if isinstance(answer, dict) else None
    if port is None or not 0 < port < 65536 or not isinstance(token, str) or not (token.isascii() and token.isalnum()):
        raise RemoteError(f"{BOX_COMMAND} jupyter answered no port and token: {text(answer, 120)!r}")
    return port, token


def _already_running(name: str, box: str) -> RunAlreadyRunning:
    return RunAlreadyRunning(
        f"run {name} is already running on box {box}",
        f"follow it with `lenslab logs {name} -f`, stop it with `lenslab stop {name}`, or pick another --name",
    )


def prepare(cfg: BoxConfig, runner: Runner, root: str) -> dict[str, Any]:
    """`lenslab up` on a box without Docker: lenslab-box answers, the root's layout exists; a
    summary in bootstrap's shape, checked the same way (its root goes into the ssh config)."""
    from lenslab.remote.bootstrap import summary_problem

    version = check_version(runner)
    summary: Any = ask(runner, root, "prepare", "--json")
    problem = summary_problem(summary) if isinstance(summary, dict) else "it is no JSON object"
    if problem:
        raise BootstrapError(f"{BOX_COMMAND} prepare's summary is not what lenslab expects: {problem}")
    if cfg.gpu == "required" and not summary["gpus"]:
        raise GPURequired(f'box {cfg.name} has no NVIDIA GPU and box.gpu is "required"')
    summary["lenslab_box"] = version
    summary["lab"] = {"engine": "none", "lenslab_box": version}
    return dict(summary)
