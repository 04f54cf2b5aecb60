"""Fixtures for lenslab's tests: a temporary HOME for every test, and "fresh VM" boxes.

A box is a container from the image tests/services/start.sh builds (Debian from debootstrap,
openssh-server, sudo, a non-root sudo user "debian"), on the host network with sshd on its own
127.0.0.1 port and the host's Docker socket mounted. No fake SSH or Docker anywhere: when the
services are missing the tests fail and say how to start them.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from lenslab_testkit import IMAGE, LABEL, VM, docker, write_config

START_HINT = "start them with: bash tests/services/start.sh"


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own HOME: nothing ever touches the real ~/.ssh."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("LENSLAB_CONFIG", raising=False)
    return home


@pytest.fixture(scope="session")
def docker_ready() -> None:
    if shutil.which("docker") is None:
        pytest.fail(f"docker CLI is missing; {START_HINT}")
    info = subprocess.run(["docker", "info"], capture_output=True, text=True, check=False)
    if info.returncode != 0:
        pytest.fail(f"Docker Engine is not running ({info.stderr.strip()[:200]}); {START_HINT}")
    image = subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True, check=False)
    if image.returncode != 0:
        pytest.fail(f"test VM image {IMAGE} is missing; {START_HINT}")


@pytest.fixture
def keypair(home: Path) -> Path:
    from lenslab import sshconfig

    return sshconfig.ensure_keypair()


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "project"
    path.mkdir()
    monkeypatch.chdir(path)
    return path


@pytest.fixture
def vm_factory(docker_ready: None, keypair: Path) -> Iterator[type[VM]]:
    started: list[VM] = []
    key = Path(str(keypair) + ".pub").read_text().strip()

    class Factory(VM):
        def __init__(self, with_docker: bool = True, authorized_key: str = key) -> None:
            super().__init__(authorized_key=authorized_key, with_docker=with_docker)
            started.append(self)

    yield Factory
    for vm in started:
        vm.stop()


@pytest.fixture
def vm(vm_factory: type[VM]) -> VM:
    return vm_factory().start()


@pytest.fixture
def box(vm: VM, project: Path) -> VM:
    """A started VM and a lenslab.toml for it (box name "t") in the current directory."""
    write_config(project, vm)
    return vm


@pytest.fixture(scope="session", autouse=True)
def _remove_leftover_vms() -> Iterator[None]:
    yield
    if shutil.which("docker"):
        ids = docker("ps", "-aq", "--filter", f"label={LABEL}", check=False).stdout.split()
        if ids:
            docker("rm", "-f", *ids, check=False)
