"""The full path on RunPod and on vast.ai, with real containers of lenslab's image.

`init` -> `offers` -> `up --cheapest --yes` -> `train` (tiny) -> `logs` -> `down` while the run
trains -> `up` on a new instance -> `train` resumes -> `logs -f` -> `pull`: the SAE pulled is
``torch.equal`` to an uninterrupted run's, and the emulator holds no instance afterwards.

RunPod keeps the run on its network volume (a host directory that outlives pods). A vast.ai
instance's disk dies with it, so the run comes back from the mirror: ``[box] mirror`` on an S3
server (moto) on 127.0.0.1, its credentials named by ``[box] mirror_env``. The instances run on
the host's network so that they reach that server, as a real instance reaches S3.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from labkit import read_status, tiny_run, wait_for
from lenslab_testkit import LABEL, LENSLAB, free_port, lenslab
from test_container_box import _assert_same_sae, box_image

from tests.support.instance_runner import InstanceRunner
from tests.support.runpod_emulator import RunPodEmulator
from tests.support.vast_emulator import VastEmulator

pytestmark = pytest.mark.slow
__all__ = ["box_image"]  # the module-scoped fixture that builds lenslab's image

TOKENS, EVERY = 400_000, 40_000
BUCKET, PREFIX = "lab", "mirror"
S3_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")
SECRET = "full-path-secret-0123456789"


def cli(*args: str, timeout: float = 300) -> Any:
    result = lenslab(*args, timeout=timeout)
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    assert SECRET not in result.stdout + result.stderr, "a credential was printed"
    return result


@pytest.fixture
def runpod(box_image: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RunPodEmulator]:
    runner = InstanceRunner(LABEL, images={"lenslab:latest": box_image})
    emulator = RunPodEmulator(tmp_path / "volumes").start()
    emulator.runner = runner
    keys = {"RUNPOD_API_KEY": emulator.api_key, "RUNPOD_API_URL": emulator.graphql_url,
            "RUNPOD_REST_URL": emulator.rest_url, "VAST_API_KEY": "", "LAMBDA_API_KEY": ""}  # fmt: skip
    for name, value in keys.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    yield emulator
    try:
        assert not emulator.live_pods() and not runner.containers, "a pod was left behind"
    finally:
        runner.close()
        emulator.stop()


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """An S3 server (moto) on 127.0.0.1 with an empty bucket; the laptop's shell holds its keys."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    values = ["full-path-key", SECRET, "us-east-1", f"http://127.0.0.1:{port}"]
    for name, value in zip(S3_ENV, values, strict=True):
        monkeypatch.setenv(name, value)
    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}")
    client.create_bucket(Bucket=BUCKET)
    yield client
    server.stop()


@pytest.fixture
def vast(box_image: str, s3: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[VastEmulator]:
    runner = InstanceRunner(LABEL, images={"lenslab:latest": box_image}, host_network=True)
    emulator = VastEmulator(disk_root=tmp_path / "disks").start()
    emulator.runner = runner
    keys = {"VAST_API_KEY": emulator.api_key, "VAST_API_URL": emulator.url, "RUNPOD_API_KEY": "", "LAMBDA_API_KEY": ""}
    for name, value in keys.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    yield emulator
    try:
        assert not emulator.instances and not runner.containers, "an instance was left behind"
    finally:
        runner.close()
        emulator.stop()


def init(project: Path, provider: str, *extra: str) -> None:
    result = cli("init", "--name", "fp", "--provider", provider)
    assert result.returncode == 0, result.stderr
    with (project / "lenslab.toml").open("a") as toml:
        toml.write("\n".join(['gpu_types = ["4090"]', "min_free_gb = 0", *extra]) + "\n")


def start_reference(run_file: Path, tmp_path: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(Path(LENSLAB).with_name("lenslab-train")), str(run_file), "--runs-dir", str(tmp_path / "ref")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def up_and_train(provider: str, run_file: Path) -> Any:
    """`offers`, `up --cheapest --yes`, `train`: the train command's result."""
    offers = cli("offers", "--gpu", "4090", "--json")
    assert offers.returncode == 0, offers.stderr
    assert any(r["provider"] == provider for r in json.loads(offers.stdout)["offers"]), offers.stdout
    up = cli("up", "--cheapest", "--yes")
    assert up.returncode == 0, up.stderr
    started = cli("train", str(run_file), "--name", "r", timeout=600)
    assert started.returncode == 0, started.stderr
    return started


def down_mid_run(root: Path) -> int:
    """`logs`, then `down` while the run trains (it checkpoints on the way out); the newest
    checkpoint's step when it went down."""
    wait_for("a checkpoint", lambda: read_status(root, "r").get("last_checkpoint"), timeout=600)
    assert read_status(root, "r")["state"] == "running", "the run ended before `down`"
    logged = cli("logs", "r")
    assert logged.returncode == 0 and logged.stdout, logged.stderr
    down = cli("down")
    assert down.returncode == 0, down.stderr
    assert "stopped 0 container" not in down.stdout, down.stdout
    return int(read_status(root, "r")["last_checkpoint"]["step"]) if root.exists() else 0


def resume_and_finish(
    run_file: Path, reference: subprocess.Popen[str], project: Path, tmp_path: Path, root: Callable[[], Path]
) -> int:
    """`up` on a new instance, `train` (it resumes), `logs -f` to its end, `pull`, compare,
    `down`; the step the run resumed from (its status.json says so once the trainer restored)."""
    up = cli("up", "--cheapest", "--yes")
    assert up.returncode == 0, up.stderr
    resumed = cli("train", str(run_file), "--name", "r", timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    step = wait_for("the resume", lambda: read_status(root(), "r").get("resumed_from_step"), timeout=600)
    assert isinstance(step, int) and step > 0, read_status(root(), "r")
    followed = cli("logs", "r", "-f", timeout=900)
    assert followed.returncode == 0, followed.stderr
    assert reference.wait(timeout=900) == 0, reference.stderr.read() if reference.stderr else ""
    pulled = cli("pull", "r")
    assert pulled.returncode == 0, pulled.stderr
    _assert_same_sae(project / "runs" / "r" / "final", tmp_path / "ref" / "tiny" / "final")
    down = cli("down")
    assert down.returncode == 0, down.stderr
    return step


def test_runpod_full_path_resumes_from_the_network_volume(
    runpod: RunPodEmulator, keypair: Path, project: Path, tmp_path: Path
) -> None:
    init(project, "runpod")
    run_file = tiny_run(project / "run", training_tokens=TOKENS, checkpoint_every_tokens=EVERY)
    reference = start_reference(run_file, tmp_path)
    first = up_and_train("runpod", run_file)
    assert "mirrored" not in first.stdout  # no mirror set: the run stays on the volume
    (volume,) = runpod.volumes.values()
    root = Path(volume["_directory"])
    stopped_at = down_mid_run(root)
    assert stopped_at > 0 and not runpod.live_pods() and read_status(root, "r")["state"] == "interrupted"

    step = resume_and_finish(run_file, reference, project, tmp_path, lambda: root)
    assert step == stopped_at  # exactly where it stopped, on the same volume
    assert read_status(root, "r")["state"] == "finished"


def test_vast_full_path_resumes_from_the_mirror(
    vast: VastEmulator, s3: Any, keypair: Path, project: Path, tmp_path: Path
) -> None:
    names = ", ".join(f'"{n}"' for n in S3_ENV)
    init(project, "vast", f'mirror = "s3://{BUCKET}/{PREFIX}"', f"mirror_env = [{names}]")
    run_file = tiny_run(project / "run", training_tokens=TOKENS, checkpoint_every_tokens=EVERY)
    reference = start_reference(run_file, tmp_path)
    first = up_and_train("vast", run_file)
    assert f"checkpoints mirrored to s3://{BUCKET}/{PREFIX}" in first.stdout, first.stdout
    (row,) = vast.instances.values()
    disk = tmp_path / "disks" / str(row["id"])
    # The run file on the box names the box's mirror; its credentials sit beside it, mode 600.
    config = disk / "runs-config" / "r"
    assert f'mirror = "s3://{BUCKET}/{PREFIX}"' in (config / "run.toml").read_text()
    secrets = config / ".mirror-env.json"
    assert secrets.stat().st_mode & 0o777 == 0o600
    assert json.loads(secrets.read_text())["AWS_SECRET_ACCESS_KEY"] == SECRET

    wait_for("a mirrored checkpoint", lambda: _mirrored(s3) > 0, timeout=600)
    down_mid_run(disk)
    assert not vast.instances and not disk.exists()  # nothing on the box outlived it
    mirrored = _mirrored(s3)

    step = resume_and_finish(run_file, reference, project, tmp_path, lambda: _disk(vast, tmp_path))
    assert step == mirrored  # the newest checkpoint the mirror held
    (second,) = vast.created[1:]
    assert second != row["id"]


def _mirrored(s3: Any) -> int:
    """The step of the checkpoint the mirror's ``latest`` names (0: none yet)."""
    try:
        body = s3.get_object(Bucket=BUCKET, Key=f"{PREFIX}/r/latest")["Body"].read().decode()
    except s3.exceptions.NoSuchKey:
        return 0
    return int(body.removeprefix("step-"))


def _disk(vast: VastEmulator, tmp_path: Path) -> Path:
    """The disk of the instance now live."""
    (row,) = vast.instances.values()
    return tmp_path / "disks" / str(row["id"])
