"""Real containers behind the emulated clouds' instances.

When an emulated RunPod pod or vast.ai instance boots, ``InstanceRunner.start`` runs a Docker
container as the cloud would: the requested image (``images`` maps an image name to a local
tag), the requested command and environment, the instance's volume directory bound at /lab, and
the container's SSH port published on 127.0.0.1 with a random host port, which becomes the
instance's public port (its public IP is 127.0.0.1). Stopping or preempting an instance stops
its container; terminating removes it. Every container carries the test run's label, so
``close`` and the test run's cleanup remove any that are left.

``host_network`` runs every container on the host's network instead (each sshd on a free
port of its own, handed over as LENSLAB_SSH_PORT), so an instance reaches the tests' services
on 127.0.0.1 (an S3 server for a mirror) as a cloud instance reaches the internet.

``adapt`` lets a test run an image that does not follow the container-box contract (the test
VM: sshd as root for user ``debian``) by rewriting what is run; see ``vm_adapter``.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

SSHD_READY_SECONDS = 30.0


@dataclass(frozen=True)
class Launch:
    """One container to run for an instance."""

    key: str  # the instance's id in its emulator
    image: str
    command: tuple[str, ...]  # () keeps the image's own
    env: dict[str, str]
    volume: Path  # bound at /lab
    port: int  # the container's SSH port, published on 127.0.0.1
    user: str | None = None  # run as this user (None: the image's)


@dataclass
class InstanceRunner:
    label: str  # "key=value": the test run's label
    images: dict[str, str] = field(default_factory=dict)
    adapt: Callable[[Launch], Launch] | None = None
    host_network: bool = False  # the host's network, sshd on a free port per instance
    containers: dict[str, str] = field(default_factory=dict)  # instance key -> container id
    started: list[Launch] = field(default_factory=list)  # every launch, as asked (before adapt)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, launch: Launch) -> tuple[str, int]:
        """Run the instance's container (replacing an old one of the same instance); its public
        address once sshd answers there."""
        self.started.append(launch)
        self.remove(launch.key)
        run = self.adapt(launch) if self.adapt is not None else launch
        if self.host_network:
            port = _free_port()
            run = replace(run, port=port, env={**run.env, "LENSLAB_SSH_PORT": str(port)})
        run.volume.mkdir(parents=True, exist_ok=True)
        run.volume.chmod(0o777)  # the image's user (not root) owns nothing on the host
        args = ["run", "-d", "--label", self.label, "--label", f"lenslab-emulated={launch.key}"]
        args += ["--network", "host"] if self.host_network else ["-p", f"127.0.0.1::{run.port}"]
        args += ["-v", f"{run.volume}:/lab"]
        for name, value in sorted(run.env.items()):
            args += ["-e", f"{name}={value}"]
        if run.user is not None:
            args += ["--user", run.user]
        image = self.images.get(run.image, run.image)
        container = _docker(*args, image, *run.command).stdout.strip()
        with self._lock:
            self.containers[launch.key] = container
        port = run.port
        if not self.host_network:
            mapped = _docker("port", container, f"{run.port}/tcp").stdout.split()[0]
            port = int(mapped.rsplit(":", 1)[1])
        wait_for_sshd(container, port)
        return "127.0.0.1", port

    def stop(self, key: str) -> None:
        container = self.containers.get(key)
        if container:
            _docker("stop", "-t", "2", container, check=False)

    def remove(self, key: str) -> None:
        with self._lock:
            container = self.containers.pop(key, None)
        if container:
            _docker("rm", "-f", container, check=False)

    def close(self) -> None:
        for key in list(self.containers):
            self.remove(key)


# The test VM image's sshd as a container box's: host keys made at start, the key handed in as
# LENSLAB_PUBLIC_KEY admitted for "debian", sshd on the contract's port on every interface.
VM_START = (
    "set -e; ssh-keygen -A >/dev/null; install -d -m 0700 -o debian -g debian /home/debian/.ssh; "
    'printf "%s\\n" "$LENSLAB_PUBLIC_KEY" > /home/debian/.ssh/authorized_keys; '
    "chown debian:debian /home/debian/.ssh/authorized_keys; chmod 0600 /home/debian/.ssh/authorized_keys; "
    'mkdir -p /run/sshd; exec /usr/sbin/sshd -D -e -p "$SSH_PORT" -o PasswordAuthentication=no'
)


def vm_adapter(launch: Launch) -> Launch:
    """Run the test VM image (lenslab-test-vm) in place of lenslab's: its own sshd start, as
    root, for user debian (the lenslab.toml sets user = "debian")."""
    env = {**launch.env, "SSH_PORT": str(launch.port)}
    return replace(launch, command=("bash", "-c", VM_START), env=env, user="root")


def _docker(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=check, timeout=120)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_sshd(container: str, port: int, timeout: float = SSHD_READY_SECONDS) -> None:
    """Until the container's sshd greets on 127.0.0.1:``port``; its log tail when it never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                if sock.recv(64).startswith(b"SSH-2.0-"):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    logs = _docker("logs", container, check=False)
    raise RuntimeError(f"sshd in {container[:12]} did not start: {(logs.stdout + logs.stderr)[-500:]}")
