"""`image = "stock"` on RunPod: the provider's stock PyTorch image, lenslab installed by `up`.

The stand-in for RunPod's stock image (``imagekit.stock_image``) is lenslab's image with
lenslab and lenslab-workspace removed, its dependencies left in the system Python, and a start
script that does what RunPod's does: root's authorized_keys from PUBLIC_KEY, sshd as root on
port 22. The full path runs on it: `up` installs lenslab into a venv on the network volume ->
`train` -> `down` mid-run -> `up` on a new pod reuses that venv (not reinstalled) -> `train`
resumes -> `logs -f` -> `pull`: the SAE is ``torch.equal`` to an uninterrupted run's.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from labkit import imagekit, tiny_run
from test_cloud_full_path import EVERY, TOKENS, cli, down_mid_run, init, resume_and_finish, runpod, start_reference
from test_container_box import box_image

from lenslab.providers.runpod.provider import RunPodProvider
from lenslab.remote import stockbox
from lenslab.remote.stockbox import STAMP_FILE, VENV
from tests.support.runpod_emulator import RunPodEmulator

pytestmark = pytest.mark.slow
__all__ = ["box_image", "runpod"]  # fixtures: lenslab's image; the RunPod emulator with real pods

REPO = Path(__file__).resolve().parents[2]


def sources(dest: Path) -> Path:
    """A copy of this checkout's sources (what `up` installs from), taken once: edits made to the
    checkout while the test runs must not count as a new lenslab."""
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for name in (*stockbox.SOURCES, "Dockerfile"):
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, symlinks=True, ignore=ignore)
        else:
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


@pytest.fixture(scope="module")
def stock_image(box_image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    import docker as sdk

    client = sdk.from_env()
    tag: str = imagekit.stock_image(client, box_image, tmp_path_factory.mktemp("stock"))
    yield tag
    imagekit.remove_stock_image(client, tag)


@pytest.fixture
def stock_runpod(runpod: RunPodEmulator, stock_image: str) -> Iterator[RunPodEmulator]:
    """The emulator's pods run the stand-in when RunPod's stock image is asked for."""
    assert runpod.runner is not None
    runpod.runner.images[RunPodProvider.stock_image] = stock_image
    yield runpod


def test_stock_image_full_path_installs_once_and_resumes(
    stock_runpod: RunPodEmulator, keypair: Path, project: Path, tmp_path: Path
) -> None:
    init(project, "runpod", f'build_context = "{sources(tmp_path / "lenslab")}"')
    toml = project / "lenslab.toml"
    toml.write_text(toml.read_text().replace('\nimage = "lenslab:latest"\n', '\nimage = "stock"\n', 1))
    run_file = tiny_run(project / "run", training_tokens=TOKENS, checkpoint_every_tokens=EVERY)
    reference = start_reference(run_file, tmp_path)
    up = cli("up", "--cheapest", "--yes", timeout=600)
    assert up.returncode == 0, up.stderr
    runner = stock_runpod.runner
    assert runner is not None
    (first,) = runner.started
    # The stock image with its own start command (sshd as root on 22), the key as PUBLIC_KEY.
    assert (first.image, first.command, first.port) == (RunPodProvider.stock_image, (), 22)
    assert first.env["PUBLIC_KEY"] == Path(f"{keypair}.pub").read_text().strip()
    (volume,) = stock_runpod.volumes.values()
    root = Path(volume["_directory"])
    venv = root / VENV
    stamp = venv / STAMP_FILE
    installed = (stamp.stat().st_mtime_ns, stamp.read_text(), (venv / "bin" / "lenslab-box").stat().st_ino)
    assert (venv / "pyvenv.cfg").read_text().count("include-system-site-packages = true") == 1
    status = cli("status", "--json")
    assert status.returncode == 0, status.stderr
    facts = json.loads(status.stdout)
    assert (facts["reachable"], facts["root"], facts["containers"]) == (True, "/lab", 0)
    started = cli("train", str(run_file), "--name", "r", timeout=600)
    assert started.returncode == 0, started.stderr
    runs = cli("runs", "--json")
    assert runs.returncode == 0 and "r" in runs.stdout, runs.stderr

    stopped_at = down_mid_run(root)
    assert stopped_at > 0 and not stock_runpod.live_pods()
    step = resume_and_finish(run_file, reference, project, tmp_path, lambda: root)
    assert step == stopped_at
    second = runner.started[1]
    assert second.key != first.key and second.image == RunPodProvider.stock_image
    # The second pod found the venv on the volume with the same stamp: nothing was reinstalled.
    after = (stamp.stat().st_mtime_ns, stamp.read_text(), (venv / "bin" / "lenslab-box").stat().st_ino)
    assert after == installed
    assert not (root / ".lenslab" / "lenslab-src.tar.gz").exists()
