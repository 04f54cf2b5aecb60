"""`lenslab train` + `lenslab watch` on an interruptible RunPod box, end to end.

The RunPod emulator's pods are real containers of lenslab's own image (``lenslab-box serve``),
their network volume a host directory. A tiny run is trained; the spot pod is preempted at
random moments while it trains, once kept by RunPod (bid back) and once removed (a new pod on
the same volume); the detached watcher brings the box back and restarts the run, which resumes
from its newest checkpoint. The SAE pulled at the end is ``torch.equal`` to an uninterrupted
run's, and the emulator holds no pod afterwards.
"""

from __future__ import annotations

import json
import random
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from labkit import read_status, tiny_run, wait_for
from lenslab_testkit import LABEL, LENSLAB, lenslab
from test_container_box import _assert_same_sae, box_image
from test_watch import stop_watcher

from tests.support.instance_runner import InstanceRunner
from tests.support.runpod_emulator import RunPodEmulator

pytestmark = pytest.mark.slow
__all__ = ["box_image"]  # the module-scoped fixture that builds lenslab's image


@pytest.fixture
def cloud(box_image: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RunPodEmulator]:
    runner = InstanceRunner(LABEL, images={"lenslab:latest": box_image})
    emulator = RunPodEmulator(tmp_path / "volumes").start()
    emulator.runner = runner
    for name, value in {
        "RUNPOD_API_KEY": emulator.api_key,
        "RUNPOD_API_URL": emulator.graphql_url,
        "RUNPOD_REST_URL": emulator.rest_url,
        "VAST_API_KEY": "",
        "LAMBDA_API_KEY": "",
    }.items():
        monkeypatch.setenv(name, value)  # fmt: skip
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    yield emulator
    stop_watcher("sp")
    try:
        assert not emulator.live_pods() and not runner.containers, "a pod was left behind"
    finally:
        runner.close()
        emulator.stop()


def cli(*args: str, timeout: float = 600) -> Any:
    result = lenslab(*args, timeout=timeout)
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    return result


def checkpoint_step(volume: Path, run: str) -> int:
    found = read_status(volume, run).get("last_checkpoint") or {}
    return int(found.get("step") or 0)


def test_a_run_preempted_twice_ends_equal_to_an_uninterrupted_one(
    cloud: RunPodEmulator, keypair: Path, project: Path, tmp_path: Path
) -> None:
    (project / "lenslab.toml").write_text(
        '[box]\nname = "sp"\nprovider = "runpod"\ngpu_types = ["4090"]\ninterruptible = true\n'
        "resume_wait_minutes = 1\nmin_free_gb = 0\nbudget_usd = 50\n"
    )
    run_file = tiny_run(project / "run", training_tokens=400_000, checkpoint_every_tokens=40_000)
    reference = subprocess.Popen(
        [str(Path(LENSLAB).with_name("lenslab-train")), str(run_file), "--runs-dir", str(tmp_path / "ref")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    up = cli("up", "--cheapest", "--yes", timeout=300)
    assert up.returncode == 0, up.stderr
    (pod,) = cloud.live_pods()
    assert pod["podType"] == "INTERRUPTABLE"
    volume = Path(next(iter(cloud.volumes.values()))["_directory"])
    started = cli("train", str(run_file), "--name", "r")
    assert started.returncode == 0, started.stderr
    watching = cli("watch", "--detach", "--poll-seconds", "1")
    assert watching.returncode == 0, watching.stderr
    try:
        rng, last = random.Random(), 0
        for remove in (False, True):
            wait_for("a newer checkpoint", lambda last=last: checkpoint_step(volume, "r") > last, timeout=600)
            time.sleep(rng.uniform(0.0, 3.0))  # a random moment of training
            if read_status(volume, "r").get("state") == "finished":
                break
            last = checkpoint_step(volume, "r")
            (live,) = [p for p in cloud.live_pods() if p["desiredStatus"] == "RUNNING"]
            cloud.preempt(live["id"], remove=remove)
            restarts = len([e for e in _events() if e["kind"] == "restarted"])
            wait_for("the watcher restarting the run", lambda n=restarts: _restarted(n), timeout=300)
        wait_for("the run to finish", lambda: read_status(volume, "r").get("state") == "finished", timeout=900)
    finally:
        stopped = cli("watch", "--stop")
    assert stopped.returncode == 0, stopped.stderr
    kinds = [e["kind"] for e in _events()]
    assert kinds.count("preempted") >= 1 and ("resumed" in kinds or "relaunched" in kinds), kinds
    runs = cli("runs")
    assert runs.returncode == 0 and "preempted" in runs.stdout, runs.stdout + runs.stderr
    costs = cli("runs", "--cost", "--json")
    (row,) = json.loads(costs.stdout)["costs"]
    assert row["run"] == "r" and 0 < row["cost_usd"] < row["on_demand_usd"]
    assert reference.wait(timeout=600) == 0, reference.stderr.read() if reference.stderr else ""
    pulled = cli("pull", "r", timeout=300)
    assert pulled.returncode == 0, pulled.stderr
    _assert_same_sae(project / "runs" / "r" / "final", tmp_path / "ref" / "tiny" / "final")
    down = cli("down", timeout=300)
    assert down.returncode == 0, down.stderr


def _events() -> list[dict[str, Any]]:
    from lenslab.watch import events

    return events.read("sp")


def _restarted(before: int) -> bool:
    return len([e for e in _events() if e["kind"] == "restarted"]) > before
