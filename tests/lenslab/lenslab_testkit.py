"""Helpers the lenslab tests share: the fresh-VM container and running the real CLI."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lenslab.watch.state import WatchState

IMAGE = os.environ.get("LENSLAB_TEST_IMAGE", "lenslab-test-vm:bookworm-1")
# Every container a test session starts carries its session's id, so two sessions running at
# once (the CI's concurrent groups) clean up only their own.
LABEL = f"lenslab-test={uuid.uuid4().hex[:12]}"
LENSLAB = str(Path(sys.executable).with_name("lenslab"))
SSHD_READY_SECONDS = 30.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def docker(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=check)


@dataclass
class VM:
    """A fresh-VM container; ``rebuild()`` replaces it on the same port with new host keys."""

    authorized_key: str
    with_docker: bool = True
    port: int = field(default_factory=free_port)
    container: str = ""
    volumes: list[str] = field(default_factory=list)  # "host:container" bind mounts

    def start(self) -> VM:
        args = [
            "run", "-d", "--network", "host", "--label", LABEL,
            "-e", f"SSH_PORT={self.port}", "-e", f"AUTHORIZED_KEY={self.authorized_key}",
            "-v", "/var/run/docker.sock:/var/run/docker.sock",
            *[arg for volume in self.volumes for arg in ("-v", volume)],
        ]  # fmt: skip
        if self.with_docker:
            # The host's Docker CLI stands in for a box where Docker is already installed.
            docker_cli = shutil.which("docker", path="/usr/bin") or "/usr/bin/docker"
            args += ["-v", f"{docker_cli}:/usr/bin/docker:ro"]
        self.container = docker(*args, IMAGE).stdout.strip()
        self._wait_for_sshd()
        return self

    def _wait_for_sshd(self) -> None:
        deadline = time.monotonic() + SSHD_READY_SECONDS
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    if sock.recv(64).startswith(b"SSH-2.0-"):
                        return
            except OSError:
                time.sleep(0.1)
        logs = docker("logs", self.container, check=False)
        raise RuntimeError(f"sshd in {self.container[:12]} did not start: {logs.stderr[-500:]}")

    def exec(self, command: str, user: str = "root") -> subprocess.CompletedProcess[str]:
        return docker("exec", "-u", user, self.container, "bash", "-c", command, check=False)

    def host_key_fingerprint(self) -> str:
        out = self.exec("ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub").stdout
        return out.split()[1]

    def rebuild(self) -> None:
        self.stop()
        self.start()

    def stop(self) -> None:
        if self.container:
            docker("rm", "-f", self.container, check=False)
            self.container = ""


def write_config(project: Path, vm: VM, name: str = "t", **extra: object) -> Path:
    lines = [
        "[box]",
        f'name = "{name}"',
        'provider = "ssh"',
        'host = "127.0.0.1"',
        'user = "debian"',
        f"port = {vm.port}",
    ]
    lines += [f"{key} = {value!r}".replace("'", '"') for key, value in extra.items()]
    path = project / "lenslab.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def lenslab(*args: str, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """Run the installed ``lenslab`` console script, as a user would."""
    return subprocess.run(
        [LENSLAB, *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class NoRuns:
    """A box with no runs, for the watcher's tests of provider states alone."""

    def observe(self, state: WatchState) -> bool:
        return True

    def prepare(self) -> None:
        """Nothing to make ready."""

    def restart(self, state: WatchState) -> dict[str, int | None]:
        return {}

    def stop(self, state: WatchState) -> list[str]:
        return []
