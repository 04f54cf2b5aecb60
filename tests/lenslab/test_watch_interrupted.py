"""Preemptions at the two awkward moments: in the middle of a checkpoint write, and while the
watcher bootstraps a relaunched instance (before its runs restarted).

As in test_watch.py, the emulated RunPod pods are real containers (the test VM image) on a
network volume (a host directory), and the job is a hash chain that checkpoints atomically
(``ckpt.tmp`` then ``mv``): its final state is known, and a resume from an older checkpoint
still ends there.
"""

from __future__ import annotations

import base64
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from test_watch import (
    Clouds,
    CounterRuns,
    box_config,
    checkpoint_step,
    clouds,
    data_dir,
    expected_state,
    provider_of,
    watcher_for,
)

from lenslab import config
from lenslab.errors import ProviderError
from lenslab.providers.container_cloud import ContainerCloud
from lenslab.watch import events
from lenslab.watch.state import FINISHED, WatchState

pytestmark = pytest.mark.slow
__all__ = ["clouds"]  # the emulated clouds fixture

STEPS, SLOW_AT = 80, 30
# The job of test_watch.py, but the save of step $2 is slow the first time: half the checkpoint
# is written, then it takes far longer than a spot pod's grace period (a big checkpoint).
SLOW_SAVE_JOB = """\
set -e
cd /lab
if [ -f ckpt ]; then read i s < ckpt; else i=0; s=seed; fi
while [ "$i" -lt "$1" ]; do
  i=$((i + 1))
  s=$(printf '%s %s' "$s" "$i" | md5sum | cut -c1-32)
  sleep 0.05
  if [ "$i" -eq "$2" ] && [ ! -f slow-save ]; then
    touch slow-save; printf '%s' "$i" > ckpt.tmp; sleep 120
  fi
  printf '%s %s\\n' "$i" "$s" > ckpt.tmp && mv ckpt.tmp ckpt
done
touch finished
"""


class SlowSaveRuns(CounterRuns):
    def restart(self, state: WatchState) -> dict[str, int | None]:
        script = base64.b64encode(SLOW_SAVE_JOB.encode()).decode()
        step = self._run(
            f"echo {script} | base64 -d > /lab/job.sh && (cat /lab/ckpt 2>/dev/null || echo 0) | cut -d' ' -f1 && "
            f"(setsid nohup sh /lab/job.sh {self.steps} {SLOW_AT} > /lab/job.log 2>&1 < /dev/null &)"
        ).stdout.split()
        resumed = int(step[0]) if step else 0
        self.restarts.append(resumed)
        return {state.runs[0].name: resumed}


def _finish(cloud: ContainerCloud, cfg: config.Config) -> None:
    box = cloud.get(cfg.box)
    if box is not None:
        cloud.terminate(box)


def test_a_preemption_during_a_checkpoint_write_resumes_from_the_previous_one(
    clouds: Clouds, keypair: Path, tmp_path: Path
) -> None:
    cfg = box_config(tmp_path, keypair, "runpod", resume_wait_minutes=0)
    cloud = provider_of(cfg)
    cloud.launch(cfg.box)
    runs, said = SlowSaveRuns(cfg, cloud, steps=STEPS), list[str]()
    watcher = watcher_for(cfg, cloud, runs, said)
    seen: dict[str, Any] = {}

    def preempt_mid_save() -> None:
        volume = data_dir(clouds, "runpod")
        assert volume is not None
        deadline = time.monotonic() + 120
        while not (volume / "slow-save").exists() or not (volume / "ckpt.tmp").exists():
            assert time.monotonic() < deadline, "the slow save never began"
            time.sleep(0.05)
        seen.update(committed=checkpoint_step(volume), partial=(volume / "ckpt.tmp").read_text())
        (pod,) = clouds.runpod.live_pods()
        clouds.runpod.preempt(pod["id"], remove=True)  # the save had not finished

    thread = threading.Thread(target=preempt_mid_save, daemon=True)
    thread.start()
    try:
        assert watcher.run(max_polls=2000) == FINISHED, said[-5:]
    finally:
        thread.join(timeout=30)
        final = (data_dir(clouds, "runpod") or tmp_path).joinpath("ckpt").read_text()
        _finish(cloud, cfg)
    # The save of step 30 was cut off: step 29's checkpoint stayed whole and the run resumed there.
    assert seen == {"committed": SLOW_AT - 1, "partial": str(SLOW_AT)}
    assert runs.restarts == [0, SLOW_AT - 1]
    assert final.split() == [str(STEPS), expected_state(STEPS)]
    assert len([e for e in events.read("w") if e["kind"] == "preempted"]) == 1
    assert not clouds.runpod.live_pods() and len(clouds.runpod.created) == 2


class LostWhileBootstrapping(CounterRuns):
    """The watcher's bootstrap of a relaunched box (``prepare``, `lenslab up`'s making ready):
    armed, the instance is taken back as the bootstrap begins, before the runs restarted."""

    def __init__(self, cfg: config.Config, provider: ContainerCloud, clouds: Clouds) -> None:
        super().__init__(cfg, provider, steps=STEPS)
        self.clouds, self.armed, self.lost = clouds, False, list[str]()

    def prepare(self) -> None:
        if self.armed:
            self.armed = False
            (pod,) = self.clouds.runpod.live_pods()
            self.lost.append(pod["id"])
            self.clouds.runpod.preempt(pod["id"], remove=True)
        box = self.provider.get(self.cfg.box)
        if box is None:
            raise ProviderError(f"box {self.cfg.box.name} is not running", "the watcher launches it again")
        self._run("true")


def test_a_preemption_during_bootstrap_is_recovered_and_the_run_resumes(
    clouds: Clouds, keypair: Path, tmp_path: Path
) -> None:
    cfg = box_config(tmp_path, keypair, "runpod", resume_wait_minutes=0)
    cloud = provider_of(cfg)
    cloud.launch(cfg.box)
    runs, said = LostWhileBootstrapping(cfg, cloud, clouds), list[str]()
    watcher = watcher_for(cfg, cloud, runs, said)
    committed: list[int] = []

    def preempt_once_running() -> None:
        volume = data_dir(clouds, "runpod")
        deadline = time.monotonic() + 120
        while checkpoint_step(volume) < 10:
            assert time.monotonic() < deadline, "the job never made progress"
            time.sleep(0.05)
        (pod,) = clouds.runpod.live_pods()
        runs.armed = True  # the next instance is lost while the watcher bootstraps it
        clouds.runpod.preempt(pod["id"], remove=True)
        committed.append(checkpoint_step(volume))

    thread = threading.Thread(target=preempt_once_running, daemon=True)
    thread.start()
    try:
        assert watcher.run(max_polls=2000) == FINISHED, said[-5:]
    finally:
        thread.join(timeout=30)
        final = (data_dir(clouds, "runpod") or tmp_path).joinpath("ckpt").read_text()
        _finish(cloud, cfg)
    assert final.split() == [str(STEPS), expected_state(STEPS)]
    log = events.read("w")
    kinds = [e["kind"] for e in log if e["kind"] in ("preempted", "relaunched", "restarted")]
    # restarted (first start), preempted, relaunched (lost in bootstrap: no restart), preempted,
    # relaunched, restarted from the checkpoint the first preemption left.
    assert kinds == ["restarted", "preempted", "relaunched", "preempted", "relaunched", "restarted"], kinds
    assert any("runs not restarted yet" in line for line in said), said
    assert runs.lost and runs.restarts == [0, committed[0]] and committed[0] >= 10
    assert len(clouds.runpod.created) == 3 and not clouds.runpod.live_pods()
