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
    def run(
        self,
        command: str,
        *,
        stdin: bytes | None = None,
        on_output: OutputSink | None = None,
        check: bool = False,
    ) -> RunResult: ...

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
        return json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError) as exc:
        raise BootstrapError(f"{name} printed no JSON summary; got: {lines[-1:]!r}") from exc


def bootstrap(
    runner: Runner, root: str, gpu: str, min_free_gb: int, on_output: OutputSink | None = None
) -> dict[str, Any]:
    env = {"LENSLAB_ROOT": root, "LENSLAB_GPU": gpu, "LENSLAB_MIN_FREE_GB": str(min_free_gb)}
    summary: dict[str, Any] = run_script(runner, "bootstrap.sh", env, on_output)
    return summary


def status(runner: Runner, root: str, box: str) -> dict[str, Any]:
    facts: dict[str, Any] = run_script(runner, "status.sh", {"LENSLAB_ROOT": root, "LENSLAB_BOX": box})
    return facts
