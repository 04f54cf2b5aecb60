"""Fixtures for the Slurm tests: a real Slurm cluster (tests/support/slurm_cluster.py), started
once per session, and a project whose box is its login node with `lenslab up` done.

- ``slurm_cluster``: the running cluster (``SlurmCluster``); the image is built on first use
  (minutes) and reused while its inputs are unchanged.
- ``keypair``: lenslab's key in this test's HOME, the one the login node accepts.
- ``slurm_sources``: lenslab's sources as `up` installs them, copied once per session.
- ``project``: an empty project directory, the cwd.
- ``slurm_project``: ``project`` with lenslab.toml for the cluster, on which
  `lenslab up` has succeeded (lenslab in a venv on the shared root).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.slurm_cluster import SlurmCluster, lenslab, lenslab_toml, slurm_image, snapshot_sources

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


@pytest.fixture(scope="session")
def session_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One ed25519 key pair for the session: the login node authorizes it at start."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    path = tmp_path_factory.mktemp("slurm-key") / "id_ed25519"
    key = ed25519.Ed25519PrivateKey.generate()
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    )
    path.chmod(0o600)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    path.with_name("id_ed25519.pub").write_text(public.decode() + " lenslab\n")
    return path


@pytest.fixture(scope="session")
def slurm_cluster(
    docker_ready: None, session_key: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SlurmCluster]:
    work = tmp_path_factory.mktemp("slurm")
    image = slurm_image(work / "build")
    cluster = SlurmCluster(
        image=image.tag,
        authorized_key=session_key.with_name("id_ed25519.pub").read_text().strip(),
        host_shared=work / "shared",
        config_dir=work / "cluster",
    )
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@pytest.fixture
def keypair(home: Path, session_key: Path) -> Path:
    """lenslab's default key in this test's HOME: the session's key, which the login node accepts."""
    from lenslab import files

    dest = files.default_key_path()
    dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    shutil.copy2(session_key, dest)
    shutil.copy2(session_key.with_name("id_ed25519.pub"), dest.with_name("id_ed25519.pub"))
    return dest


@pytest.fixture(scope="session")
def slurm_sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return snapshot_sources(tmp_path_factory.mktemp("slurm-sources") / "lenslab")


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty project directory, the cwd."""
    path = tmp_path / "project"
    path.mkdir()
    monkeypatch.chdir(path)
    return path


@pytest.fixture
def slurm_project(project: Path, slurm_cluster: SlurmCluster, keypair: Path, slurm_sources: Path) -> Path:
    (project / "lenslab.toml").write_text(lenslab_toml(slurm_cluster, slurm_sources))
    up = lenslab(project, "up", "--json")
    assert up.returncode == 0, f"lenslab up failed:\n{up.stdout[-2000:]}\n{up.stderr[-2000:]}"
    return project
