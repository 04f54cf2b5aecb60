"""The image as a container box's: `lenslab-box serve` as the start command, sshd unprivileged
on 2222, the host key kept on the volume; the default command stays Jupyter for Docker boxes."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import docker
import imagekit
import pytest

pytestmark = pytest.mark.slow


def _banner(port: int, timeout: float = 60) -> bytes:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                banner = sock.recv(64)
                if banner.startswith(b"SSH-2.0-"):
                    return banner
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"no sshd on 127.0.0.1:{port} within {timeout:.0f}s")


def _serve(client: docker.DockerClient, containers: list[str], image: str, lab: Path, key: str) -> tuple[object, int]:
    container = client.containers.run(
        image, ["lenslab-box", "serve"], detach=True, user="lab", volumes={str(lab): {"bind": "/lab", "mode": "rw"}},
        environment={"LENSLAB_PUBLIC_KEY": key}, ports={"2222/tcp": ("127.0.0.1", None)},
        labels={"lenslab.test": "image"},
    )  # fmt: skip
    containers.append(container.id)
    for _ in range(100):
        container.reload()
        mapped = container.ports.get("2222/tcp")
        if mapped:
            return container, int(mapped[0]["HostPort"])
        time.sleep(0.1)
    raise AssertionError("port 2222 was not published")


def test_serve_runs_sshd_as_lab_and_keeps_the_host_key_on_the_volume(
    client: docker.DockerClient, containers: list[str], image: imagekit.Build, lab_root: Path
) -> None:
    attrs = client.images.get(image.tag).attrs["Config"]
    assert attrs["Cmd"][:2] == ["jupyter", "lab"]  # Docker boxes keep Jupyter as the default
    assert "2222/tcp" in attrs["ExposedPorts"]
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB3xKqLnG1m4C9mJbqFkE0Zk0x1YVZB5vLrQ0b1fK2Zp test"
    first, port = _serve(client, containers, image.tag, lab_root, key)
    _banner(port)
    ssh_dir = lab_root / ".lenslab" / "ssh"
    assert (ssh_dir / "authorized_keys").read_text() == key + "\n"
    assert oct((ssh_dir / "ssh_host_ed25519_key").stat().st_mode & 0o777) == "0o600"
    config = (ssh_dir / "sshd_config").read_text()
    for line in ("Port 2222", "PasswordAuthentication no", "PermitRootLogin no", "AllowUsers lab"):
        assert line in config.splitlines()
    ps = first.exec_run(["ps", "-o", "user=,args=", "-C", "sshd"]).output.decode()  # type: ignore[attr-defined]
    assert ps.strip() and all(line.split()[0] == "lab" for line in ps.strip().splitlines()), ps
    host_key = (ssh_dir / "ssh_host_ed25519_key.pub").read_text()

    # A new instance on the same volume shows the same host key.
    first.remove(force=True)  # type: ignore[attr-defined]
    _second, port = _serve(client, containers, image.tag, lab_root, key)
    _banner(port)
    assert (ssh_dir / "ssh_host_ed25519_key.pub").read_text() == host_key


def test_serve_refuses_a_key_that_is_not_one(
    client: docker.DockerClient, containers: list[str], image: imagekit.Build, lab_root: Path
) -> None:
    container = client.containers.run(
        image.tag, ["lenslab-box", "serve"], detach=True, volumes={str(lab_root): {"bind": "/lab", "mode": "rw"}},
        environment={"LENSLAB_PUBLIC_KEY": "not a key\nPermitRootLogin yes"}, labels={"lenslab.test": "image"},
    )  # fmt: skip
    containers.append(container.id)
    assert container.wait(timeout=60)["StatusCode"] == 2
    logs = container.logs().decode()
    assert logs == "lenslab-box: error: LENSLAB_PUBLIC_KEY holds something that is not an OpenSSH public key line\n"
    assert not (lab_root / ".lenslab" / "ssh" / "sshd_config").exists()
