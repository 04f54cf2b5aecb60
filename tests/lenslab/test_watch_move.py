"""One training run through five preemptions on two clouds, kept going by `lenslab watch`.

The box is a RunPod spot pod (lenslab.toml names runpod) whose runs are mirrored to an S3
server (moto) on 127.0.0.1. The pod is preempted at random moments of training: first kept by
RunPod (the watcher bids it back), then removed; vast.ai's interruptible 4090 is cheaper than a
RunPod spot pod, so the watcher moves the box there: its volume stays behind on RunPod and the run
comes back from the mirror. Three more preemptions (outbid) follow on vast.ai. `status`, `runs`,
`pull` and `down` find the box where it lives now; the SAE pulled is ``torch.equal`` to an
uninterrupted run's, and neither emulator holds an instance at the end.

Every instance is a real container of lenslab's image on the host's network (so it reaches the
S3 server, as a cloud instance reaches S3); volumes and disks are host directories.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from labkit import read_status, tiny_run, wait_for
from lenslab_testkit import LABEL
from test_cloud_full_path import BUCKET, PREFIX, S3_ENV, _mirrored, cli, s3, start_reference
from test_container_box import _assert_same_sae, box_image
from test_watch import stop_watcher

from tests.support.instance_runner import InstanceRunner
from tests.support.runpod_emulator import RunPodEmulator
from tests.support.vast_emulator import VastEmulator

pytestmark = pytest.mark.slow
__all__ = ["box_image", "s3"]  # fixtures: lenslab's image, the S3 server

TOKENS, EVERY = 600_000, 40_000
BOX = "mv"
# Where each preemption lands and how: a RunPod spot pod exits (kept) or is removed; a vast.ai
# instance is outbid (kept, with its disk).
PLAN = [("runpod", "kept"), ("runpod", "removed"), ("vast", "outbid"), ("vast", "outbid"), ("vast", "outbid")]


class Clouds:
    def __init__(self, runpod: RunPodEmulator, vast: VastEmulator, runner: InstanceRunner, disks: Path) -> None:
        self.runpod, self.vast, self.runner, self.disks = runpod, vast, runner, disks

    def root(self) -> Path | None:
        """The live instance's /lab on this machine: the vast.ai disk, else RunPod's volume."""
        if self.vast.instances:
            return self.disks / str(next(iter(self.vast.instances)))
        return next((Path(v["_directory"]) for v in self.runpod.volumes.values()), None)

    def preempt(self, provider: str, how: str) -> None:
        if provider == "runpod":
            (pod,) = [p for p in self.runpod.live_pods() if p["desiredStatus"] == "RUNNING"]
            assert not self.vast.instances, "the box is on vast.ai already"
            self.runpod.preempt(pod["id"], remove=how == "removed")
        else:
            (row,) = self.vast.instances.values()
            assert not self.runpod.live_pods(), "a RunPod pod is still live after the move"
            self.vast.preempt(row["id"])


@pytest.fixture
def clouds(box_image: str, s3: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Clouds]:
    runner = InstanceRunner(LABEL, images={"lenslab:latest": box_image}, host_network=True)
    runpod, vast = RunPodEmulator(tmp_path / "volumes"), VastEmulator(disk_root=tmp_path / "disks")
    runpod.runner = vast.runner = runner
    runpod.start()
    vast.start()
    keys = {
        "RUNPOD_API_KEY": runpod.api_key, "RUNPOD_API_URL": runpod.graphql_url, "RUNPOD_REST_URL": runpod.rest_url,
        "VAST_API_KEY": vast.api_key, "VAST_API_URL": vast.url, "LAMBDA_API_KEY": "",
    }  # fmt: skip
    for name, value in keys.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    yield Clouds(runpod, vast, runner, tmp_path / "disks")
    stop_watcher(BOX)
    try:
        assert not runpod.live_pods() and not vast.instances, "an instance was left behind"
        assert not runner.containers, "a container was left behind"
    finally:
        runner.close()
        runpod.stop()
        vast.stop()


def _events() -> list[dict[str, Any]]:
    from lenslab.watch import events

    return events.read(BOX)


def _count(kind: str) -> int:
    return len([e for e in _events() if e["kind"] == kind])


def _checkpoint(clouds: Clouds) -> int:
    root = clouds.root()
    status = read_status(root, "r") if root is not None else {}
    return int((status.get("last_checkpoint") or {}).get("step") or 0) if status.get("state") == "running" else 0


def test_five_preemptions_on_two_clouds_end_equal_to_an_uninterrupted_run(
    clouds: Clouds, s3: Any, keypair: Path, project: Path, tmp_path: Path
) -> None:
    names = ", ".join(f'"{n}"' for n in S3_ENV)
    (project / "lenslab.toml").write_text(
        f'[box]\nname = "{BOX}"\nprovider = "runpod"\ngpu_types = ["4090"]\ninterruptible = true\n'
        f'resume_wait_minutes = 1\nmin_free_gb = 0\nbudget_usd = 50\nmirror = "s3://{BUCKET}/{PREFIX}"\n'
        f"mirror_env = [{names}]\n"
    )
    run_file = tiny_run(project / "run", training_tokens=TOKENS, checkpoint_every_tokens=EVERY)
    reference = start_reference(run_file, tmp_path)
    assert cli("up", "--cheapest", "--yes").returncode == 0
    assert len(clouds.runpod.live_pods()) == 1 and not clouds.vast.instances  # where lenslab.toml says
    started = cli("train", str(run_file), "--name", "r", timeout=600)
    assert started.returncode == 0, started.stderr
    watching = cli("watch", "--detach", "--poll-seconds", "1")
    assert watching.returncode == 0, watching.stderr
    rng = random.Random()
    try:
        for provider, how in PLAN:
            last = _checkpoint(clouds)
            wait_for("a newer checkpoint", lambda last=last: _checkpoint(clouds) > last, timeout=600)
            time.sleep(rng.uniform(0.0, 3.0))  # a random moment of training
            assert read_status(clouds.root() or tmp_path, "r").get("state") == "running", "finished too soon"
            restarts = _count("restarted")
            clouds.preempt(provider, how)
            wait_for("the watcher restarting the run", lambda n=restarts: _count("restarted") > n, timeout=600)
        wait_for("the run to finish", lambda: read_status(clouds.root() or tmp_path, "r").get("state") == "finished",
                 timeout=900)  # fmt: skip
    finally:
        stopped = cli("watch", "--stop")
    assert stopped.returncode == 0, stopped.stderr
    _assert_recorded(clouds, _mirrored(s3))
    assert reference.wait(timeout=900) == 0, reference.stderr.read() if reference.stderr else ""
    pulled = cli("pull", "r", timeout=300)  # from vast.ai, where the box lives now
    assert pulled.returncode == 0, pulled.stderr
    _assert_same_sae(project / "runs" / "r" / "final", tmp_path / "ref" / "tiny" / "final")
    down = cli("down", timeout=300)
    assert down.returncode == 0, down.stderr
    assert not clouds.vast.instances and not clouds.runpod.live_pods()


def _assert_recorded(clouds: Clouds, mirrored: int) -> None:
    """Five preemptions, one move (runpod -> vast), the run resumed from the mirror after it,
    and `status` and `runs` show the box where it lives now."""
    found = _events()
    assert _count("preempted") == 5 and _count("restarted") >= 5, [e["kind"] for e in found]
    (moved,) = [e for e in found if e["kind"] == "moved"]
    assert moved["provider"] == "vast" and "from runpod" in moved["reason"]
    after = [e for e in found if e["kind"] == "restarted" and e["time"] > moved["time"]]
    assert after and after[0]["provider"] == "vast" and after[0]["steps"].get("r", 0) > 0, after
    # vast.ai's disk started empty: the step the run resumed from came from the mirror.
    assert 0 < after[0]["steps"]["r"] <= mirrored
    root = clouds.root()
    assert root is not None
    log = (root / "runs" / "r" / "train.log").read_text()
    assert f"restored checkpoint step-{after[0]['steps']['r']:09d} from mirror s3://{BUCKET}/{PREFIX}" in log
    assert len(clouds.runpod.created) == 1 and len(clouds.vast.created) == 1  # one pod (resumed), one move
    status = cli("status", "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["provider"] == "vast", status.stdout
    runs = cli("runs")  # the newest recoveries: those on vast.ai, where it lives now
    assert runs.returncode == 0 and "preempted  on vast" in runs.stdout, runs.stdout
    assert "r    finished" in runs.stdout, runs.stdout
