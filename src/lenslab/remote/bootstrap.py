"""Run the provision/ scripts on a box and read their JSON summary.

The scripts are piped into ``bash -s`` rather than uploaded, so a repeated ``lenslab up`` writes
nothing on the box. Both the SSH link and the local runner satisfy ``Runner``.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import threading
from importlib import resources
from typing import Any, Protocol

from lenslab import values
from lenslab.errors import (
    BootstrapError,
    CommandFailed,
    DiskFull,
    GPURequired,
    NoDockerPermission,
    NoSudo,
    UnsupportedOS,
)
from lenslab.records import OutputSink, RunResult
from lenslab.remote.transfer import Sink, Source, local_get, local_put

# The script's "lenslab-error[<kind>]: ..." line, and the error each kind becomes.
_ERROR_LINE = re.compile(r"^lenslab-error\[(?P<kind>[a-z-]+)\]: (?P<message>.+)$", re.MULTILINE)
ERROR_KINDS: dict[str, type[BootstrapError]] = {
    "no-sudo": NoSudo,
    "unsupported-os": UnsupportedOS,
    "gpu-required": GPURequired,
    "disk-full": DiskFull,
    "docker-permission": NoDockerPermission,
}


class Runner(Protocol):
    """How lenslab acts on a box: ``SSHLink`` for a remote one, ``LocalRunner`` for this machine."""

    def run(
        self,
        command: str,
        *,
        stdin: bytes | None = None,
        on_output: OutputSink | None = None,
        check: bool = False,
    ) -> RunResult: ...

    def put(self, source: Source, remote_path: str, mode: int = 0o644) -> None:
        """Write ``source`` to ``remote_path`` atomically, streamed in chunks."""

    def get(self, remote_path: str, dest: Sink) -> int:
        """Copy ``remote_path`` into ``dest`` in chunks; the number of bytes."""

    def close(self) -> None: ...


class LocalRunner:
    """Runs commands on this machine: the local provider's box is the user's own machine."""

    def run(
        self,
        command: str,
        *,
        stdin: bytes | None = None,
        on_output: OutputSink | None = None,
        check: bool = False,
    ) -> RunResult:
        with subprocess.Popen(
            ["bash", "-c", command],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
        ) as proc:
            assert proc.stdin and proc.stdout and proc.stderr
            stderr = proc.stderr
            # stderr on a thread, so neither pipe can fill up and stall the other.
            err_parts: list[str] = []
            reader = threading.Thread(target=lambda: err_parts.append(stderr.read()))
            reader.start()
            if stdin is not None:
                proc.stdin.write(stdin.decode())
            proc.stdin.close()
            out_parts = []
            for line in proc.stdout:
                out_parts.append(line)
                if on_output:
                    on_output("stdout", line)
            reader.join()
            proc.wait()
        out, err = "".join(out_parts), "".join(err_parts)
        if on_output and err:
            on_output("stderr", err)
        if check and proc.returncode != 0:
            raise CommandFailed(f"`{command}` exited {proc.returncode}: {err.strip()}", proc.returncode)
        return RunResult(proc.returncode, out, err)

    def put(self, source: Source, remote_path: str, mode: int = 0o644) -> None:
        local_put(source, remote_path, mode)

    def get(self, remote_path: str, dest: Sink) -> int:
        return local_get(remote_path, dest)

    def close(self) -> None:
        """Nothing to close: every command is its own process."""


def script(name: str) -> bytes:
    return (resources.files("lenslab") / "provision" / name).read_bytes()


def run_script(
    runner: Runner, name: str, env: dict[str, str], on_output: OutputSink | None = None, *, sudo: bool = False
) -> Any:
    """Run provision/<name> with ``env`` (as root with ``sudo``); returns its JSON summary or raises."""
    assignments = " ".join(f"{key}={shlex.quote(value)}" for key, value in env.items())
    command = f"env {assignments} bash -s"
    if sudo:
        command = f'if [ "$(id -u)" = 0 ]; then {command}; else sudo -n {command}; fi'
    result = runner.run(command, stdin=script(name), on_output=on_output)
    if result.exit_status != 0:
        match = _ERROR_LINE.search(result.stderr)
        if match:
            raise ERROR_KINDS.get(match["kind"], BootstrapError)(match["message"])
        tail = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()[-1]
        raise BootstrapError(f"{name} failed on the box (exit {result.exit_status}): {tail}")
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    try:
        summary = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError) as exc:
        raise BootstrapError(f"{name} printed no JSON summary; got: {ascii(lines[-1:])[:200]}") from exc
    if not isinstance(summary, dict):
        raise BootstrapError(f"{name} printed a summary that is no JSON object: {ascii(lines[-1])[:200]}")
    return summary


def bootstrap(
    runner: Runner, root: str, gpu: str, min_free_gb: int, on_output: OutputSink | None = None
) -> dict[str, Any]:
    env = {"LENSLAB_ROOT": root, "LENSLAB_GPU": gpu, "LENSLAB_MIN_FREE_GB": str(min_free_gb)}
    summary: dict[str, Any] = run_script(runner, "bootstrap.sh", env, on_output)
    problem = summary_problem(summary)
    if problem:
        # Its root goes into ~/.ssh/lenslab/config and every later command: believed as printed,
        # a newline there would add OpenSSH directives on the laptop.
        raise BootstrapError(
            f"bootstrap.sh's summary is not what lenslab expects: {problem}",
            "nothing was written here; check the box's login shell, ~/.bashrc and PATH",
        )
    return summary


# Each summary field and the JSON types it may have (bool is refused where a number is wanted).
_SUMMARY_FIELDS: dict[str, tuple[type, ...]] = {
    "os": (str,),
    "os_version": (str,),
    "gpus": (list,),
    "driver": (str, type(None)),
    "docker": (str,),
    "docker_access": (str,),
    "root": (str,),
    "disk_free_gb": (int, float),
    "changed": (list,),
    "warnings": (list,),
}
_MAX_SUMMARY_TEXT = 1000


def summary_problem(summary: dict[str, Any]) -> str | None:
    """What is wrong with bootstrap.sh's summary (shape, types, the root), or None."""
    for field, types in _SUMMARY_FIELDS.items():
        value = summary.get(field)
        if field not in summary or isinstance(value, bool) or not isinstance(value, types):
            return f"{field} is {ascii(value)[:80]}, not {' or '.join(t.__name__ for t in types)}"
    root_problem = values.path_problem(summary["root"], absolute=True, home=False)
    if root_problem:
        return f"root {ascii(summary['root'])[:120]} {root_problem}"
    texts = [(f, summary[f]) for f in ("os", "os_version", "docker", "docker_access", "driver") if summary[f]]
    for field in ("changed", "warnings"):
        if not all(isinstance(item, str) for item in summary[field]):
            return f"{field} holds something other than text"
        texts += [(field, item) for item in summary[field]]
    for gpu in summary["gpus"]:
        if not (isinstance(gpu, dict) and isinstance(gpu.get("name"), str) and type(gpu.get("memory_mib")) is int):
            return f"gpus holds {ascii(gpu)[:80]}, not {{name, memory_mib}}"
        texts.append(("gpus", gpu["name"]))
    for field, text in texts:
        # Printed on the laptop's terminal: no line breaks, no escape sequences.
        char = values.bad_char(text)
        if char is not None or len(text) > _MAX_SUMMARY_TEXT:
            return f"{field} {ascii(text)[:80]} " + (f"holds the control character {char}" if char else "is too long")
    return None


# status.sh's facts and the JSON types each may have. Only these reach `lenslab status`: the box
# speaks for itself, never for the laptop's own fields (cost, instances, autostop, ...).
_NONE = type(None)
_STATUS_FIELDS: dict[str, tuple[type, ...]] = {
    "root": (str,),
    "root_exists": (bool,),
    "root_used_kb": (int, _NONE),
    "disk_total_kb": (int, _NONE),
    "disk_free_kb": (int, _NONE),
    "gpus": (list,),
    "driver": (str, _NONE),
    "uptime_s": (int, _NONE),
    "containers": (int, _NONE),
}
_GPU_FIELDS: dict[str, tuple[type, ...]] = {"name": (str,), "memory_mib": (int, _NONE), "utilization_pct": (int, _NONE)}


def status(runner: Runner, root: str, box: str) -> dict[str, Any]:
    """status.sh's facts, checked field by field; unknown fields are dropped, a wrong one refused."""
    raw: dict[str, Any] = run_script(runner, "status.sh", {"LENSLAB_ROOT": root, "LENSLAB_BOX": box})
    return check_status_facts(raw, "status.sh")


def check_status_facts(raw: object, source: str) -> dict[str, Any]:
    """The facts ``source`` printed, in status.sh's shape, checked; a wrong one is refused."""
    if not isinstance(raw, dict):
        raise BootstrapError(f"{source}'s facts are not what lenslab expects: not a JSON object")
    facts, problem = _pick(raw, _STATUS_FIELDS, "")
    gpus: list[dict[str, Any]] = []
    for index, gpu in enumerate(facts.get("gpus", [])):
        if not isinstance(gpu, dict):
            problem = f"gpus[{index}] is {ascii(gpu)[:80]}, not an object"
            break
        picked, problem = _pick(gpu, _GPU_FIELDS, f"gpus[{index}].")
        gpus.append(picked)
    if problem:
        raise BootstrapError(
            f"{source}'s facts are not what lenslab expects: {problem}",
            "check the box's nvidia-smi, login shell, ~/.bashrc and PATH",
        )
    return {**facts, "gpus": gpus}


def _pick(raw: dict[str, Any], fields: dict[str, tuple[type, ...]], where: str) -> tuple[dict[str, Any], str | None]:
    """The known ``fields`` of ``raw`` when each has its type (bool is no number), else a problem."""
    for field, types in fields.items():
        value = raw.get(field)
        is_bool = isinstance(value, bool) and bool not in types
        if field not in raw or is_bool or not isinstance(value, types):
            return {}, f"{where}{field} is {ascii(value)[:80]}, not {' or '.join(t.__name__ for t in types)}"
        if isinstance(value, str) and (values.bad_char(value) is not None or len(value) > _MAX_SUMMARY_TEXT):
            # Printed on the laptop's terminal: no line breaks, no escape sequences.
            return {}, f"{where}{field} {ascii(value)[:80]} holds a control character or is too long"
    return {field: raw[field] for field in fields}, None
