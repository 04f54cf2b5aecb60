"""Fixtures for the image tests: a real Docker Engine, lenslab's image built from the Dockerfile.

Nothing is faked. When the engine or npm is missing the tests fail and say how to get them;
bash tests/services/start.sh starts dockerd and builds the base image.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import docker
import docker.errors
import imagekit
import pytest

START_HINT = "start it with: bash tests/services/start.sh"
# The devcontainer CLI these tests drive; the same major version VSCode's extension embeds.
DEVCONTAINER_CLI = "@devcontainers/cli@0"


@pytest.fixture(scope="session")
def client() -> Iterator[docker.DockerClient]:
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as exc:
        pytest.fail(f"Docker Engine is not reachable ({exc}); {START_HINT}")
    yield client
    client.close()


@pytest.fixture(scope="session")
def base_id(client: docker.DockerClient) -> str:
    return imagekit.ensure_base_image(client)


@pytest.fixture(scope="session")
def wheel() -> Path:
    return imagekit.torch_wheel()


@pytest.fixture(scope="session")
def buildargs(wheel: Path) -> dict[str, str]:
    return {"BASE_IMAGE": imagekit.BASE_IMAGE, "TORCH_SPEC": imagekit.torch_spec(wheel)}


@pytest.fixture(scope="session")
def context(tmp_path_factory: pytest.TempPathFactory, wheel: Path) -> Path:
    return imagekit.make_context(tmp_path_factory.mktemp("image") / "context", wheel)


@pytest.fixture(scope="session")
def image(client: docker.DockerClient, context: Path, buildargs: dict[str, str], base_id: str) -> imagekit.Build:
    """lenslab's image for the current checkout; built once, then reused while nothing changed."""
    built = imagekit.build_cached(client, context, buildargs, base_id)
    # Older content keys are images of earlier checkouts: drop them so the disk does not fill.
    for old in client.images.list(name=imagekit.IMAGE_REPO):
        if built.image_id != old.id:
            for tag in old.tags:
                client.images.remove(tag, noprune=False)
    return built


@pytest.fixture
def lab_root(tmp_path: Path) -> Path:
    """A persistent root on the host, laid out as provision/bootstrap.sh makes it."""
    root = tmp_path / "lab"
    for sub in ("workspace", "checkpoints", "hf-cache", "runs"):
        (root / sub).mkdir(parents=True)
    # The image's user (UID 1000) must write here, whoever runs the tests.
    for path in (root, *root.iterdir()):
        path.chmod(0o777)
    return root


@pytest.fixture
def containers(client: docker.DockerClient) -> Iterator[list[str]]:
    """Ids of containers a test started; removed afterwards, whatever happened."""
    started: list[str] = []
    yield started
    for cid in started:
        with contextlib.suppress(docker.errors.NotFound):
            client.containers.get(cid).remove(force=True)


@pytest.fixture(scope="session")
def devcontainer_cli() -> Path:
    """The devcontainer CLI, installed with npm into the test cache once."""
    npm = shutil.which("npm")
    if npm is None:
        pytest.fail("npm is missing: install Node.js 18+ with npm (the devcontainer CLI is an npm package)")
    prefix = imagekit.CACHE / "npm"
    binary = prefix / "node_modules" / ".bin" / "devcontainer"
    if not binary.exists():
        proc = subprocess.run([npm, "install", "--prefix", str(prefix), "--no-audit", "--no-fund", DEVCONTAINER_CLI],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not binary.exists():
            pytest.fail(f"npm install {DEVCONTAINER_CLI} failed:\n{proc.stderr[-2000:]}")
    return binary
