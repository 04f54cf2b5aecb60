"""`lenslab watch` against emulated clouds whose instances are real containers.

Preemptions are injected at random moments of a job that checkpoints on the instance's
persistent root; the watcher notices, resumes the instance through the API or launches another
one on the same volume, restarts the job over SSH, and the job finishes with exactly the state
of an uninterrupted run. Until `lenslab train` runs on container boxes here, the job is a hash
chain with an atomic checkpoint (the property the trainer has: resume = the same result); the
instances run the test VM image (sshd for user debian), as in test_container_boxes.py.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from lenslab_testkit import IMAGE, LABEL, lenslab

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from lenslab import config
from lenslab.config import BoxConfig
from lenslab.providers import container_ledger
from lenslab.providers.container_cloud import ContainerCloud
from lenslab.providers.runpod.provider import RunPodProvider
from lenslab.providers.vast.provider import VastProvider
from lenslab.watch import events
from lenslab.watch import state as states
from lenslab.watch.state import BUDGET, FINISHED, WatchedRun, WatchState
from lenslab.watch.watcher import Watcher
from tests.support.instance_runner import InstanceRunner, vm_adapter
from tests.support.runpod_emulator import RunPodEmulator
from tests.support.vast_emulator import VastEmulator

pytestmark = pytest.mark.slow
STEPS = 120
JOB = """\
set -e
cd /lab
if [ -f ckpt ]; then read i s < ckpt; else i=0; s=seed; fi
while [ "$i" -lt "$1" ]; do
  i=$((i + 1))
  s=$(printf '%s %s' "$s" "$i" | md5sum | cut -c1-32)
  sleep 0.05
  printf '%s %s\\n' "$i" "$s" > ckpt.tmp && mv ckpt.tmp ckpt
done
touch finished
"""


def expected_state(steps: int) -> str:
    """What an uninterrupted run of the job ends with."""
    state = "seed"
    for i in range(1, steps + 1):
        state = hashlib.md5(f"{state} {i}".encode()).hexdigest()
    return state


@dataclass
class Clouds:
    runpod: RunPodEmulator
    vast: VastEmulator
    runner: InstanceRunner

    def env(self) -> dict[str, str]:
        return {
            "RUNPOD_API_KEY": self.runpod.api_key, "RUNPOD_API_URL": self.runpod.graphql_url,
            "RUNPOD_REST_URL": self.runpod.rest_url, "VAST_API_KEY": self.vast.api_key, "VAST_API_URL": self.vast.url,
        }  # fmt: skip


@pytest.fixture
def clouds(docker_ready: None, keypair: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Clouds]:
    runner = InstanceRunner(LABEL, images={"lenslab:latest": IMAGE}, adapt=vm_adapter)
    runpod, vast = RunPodEmulator(tmp_path / "volumes"), VastEmulator(disk_root=tmp_path / "disks")
    runpod.runner = vast.runner = runner
    started = Clouds(runpod.start(), vast.start(), runner)
    for name, value in started.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    yield started
    stop_watcher("w")
    try:
        assert not runpod.live_pods() and not vast.instances, "an instance was left behind"
        assert not runner.containers, "a container was left behind"
    finally:
        runner.close()
        runpod.stop()
        vast.stop()


def stop_watcher(box: str) -> None:
    """A detached watcher a failed test left running is stopped (by its pid), never leaked."""
    pid = states.read_pid(box)
    if pid is not None and states.is_locked(box):
        os.kill(pid, signal.SIGKILL)


def box_config(tmp_path: Path, keypair: Path, provider: str, **fields: Any) -> config.Config:
    extra: dict[str, Any] = {"mirror": "s3://bucket/lenslab"} if provider == "vast" else {}
    box = BoxConfig(name="w", provider=provider, user="debian", identity_file=str(keypair), gpu_types=["4090"],
                    interruptible=True, **extra, **fields)  # fmt: skip
    return config.Config(box=box, path=tmp_path / "lenslab.toml")


def provider_of(cfg: config.Config) -> ContainerCloud:
    cls = RunPodProvider if cfg.box.provider == "runpod" else VastProvider
    return cls(confirm=lambda _: True, warn=lambda _: None)


class CounterRuns:
    """The job as a run: started over SSH (detached on the box), observed by its checkpoint."""

    def __init__(self, cfg: config.Config, provider: ContainerCloud, steps: int = STEPS) -> None:
        self.cfg, self.provider, self.steps = cfg, provider, steps
        self.restarts: list[int | None] = []

    def _run(self, command: str) -> Any:
        box = self.provider.get(self.cfg.box)
        assert box is not None
        runner = self.provider.connect(box, attempts=2)
        try:
            return runner.run(command)
        finally:
            runner.close()

    def prepare(self) -> None:
        """The test VM image has no lenslab-box to make ready: the job needs only sshd and /lab."""

    def observe(self, state: WatchState) -> bool:
        got = self._run("cat /lab/ckpt 2>/dev/null || echo 0 x; test -f /lab/finished && echo finished || true")
        run = state.runs[0]
        run.step = int(got.stdout.split()[0])
        run.finished = "finished" in got.stdout
        return True

    def restart(self, state: WatchState) -> dict[str, int | None]:
        script = base64.b64encode(JOB.encode()).decode()
        step = self._run(
            f"echo {script} | base64 -d > /lab/job.sh && (cat /lab/ckpt 2>/dev/null || echo 0) | cut -d' ' -f1 && "
            f"(setsid nohup sh /lab/job.sh {self.steps} > /lab/job.log 2>&1 < /dev/null &)"
        ).stdout.split()
        resumed = int(step[0]) if step else 0
        self.restarts.append(resumed)
        return {state.runs[0].name: resumed}

    def stop(self, state: WatchState) -> list[str]:
        self._run("pkill -f 'sh /lab/[j]ob.sh' || true")
        return [state.runs[0].name]


def data_dir(clouds: Clouds, provider: str) -> Path | None:
    """Where the current instance's /lab is on this machine."""
    if provider == "runpod":
        return next((Path(v["_directory"]) for v in clouds.runpod.volumes.values()), None)
    rows = list(clouds.vast.instances)
    return clouds.vast.disk_root / str(rows[0]) if rows and clouds.vast.disk_root else None


def checkpoint_step(directory: Path | None) -> int:
    try:
        return int((directory / "ckpt").read_text().split()[0])  # type: ignore[operator]
    except (OSError, ValueError, IndexError, TypeError):
        return 0


def preempter(clouds: Clouds, provider: str, kinds: list[str], done: threading.Event) -> threading.Thread:
    """Preempt the live instance at random moments, each after the job made progress."""

    def loop() -> None:
        rng, last = random.Random(), 0
        for kind in kinds:
            while not done.is_set() and checkpoint_step(data_dir(clouds, provider)) <= last + 5:
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 1.0))
            if done.is_set():
                return
            last = checkpoint_step(data_dir(clouds, provider))
            if provider == "runpod":
                pod = next(p for p in clouds.runpod.live_pods() if p["desiredStatus"] == "RUNNING")
                clouds.runpod.preempt(pod["id"], remove=kind == "remove")
            else:
                clouds.vast.preempt(next(iter(clouds.vast.instances)))

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


def watcher_for(cfg: config.Config, provider: ContainerCloud, runs: Any, said: list[str]) -> Watcher:
    watcher = Watcher(cfg, provider, runs, say=said.append, poll_seconds=0.3, unreachable_seconds=3.0)
    watcher.state.runs.append(WatchedRun(name="count", run_file=""))
    watcher.state.restart_pending = True  # the first healthy look starts the job
    return watcher


@pytest.mark.parametrize(
    ("provider", "kinds"),
    [("runpod", ["exit", "remove", "exit"]), ("vast", ["outbid", "outbid"])],
)
def test_preempted_runs_come_back_and_end_as_an_uninterrupted_run(
    clouds: Clouds, keypair: Path, tmp_path: Path, provider: str, kinds: list[str]
) -> None:
    cfg = box_config(tmp_path, keypair, provider, resume_wait_minutes=0.5)
    cloud = provider_of(cfg)
    cloud.launch(cfg.box)
    runs, said = CounterRuns(cfg, cloud), list[str]()
    watcher = watcher_for(cfg, cloud, runs, said)
    done = threading.Event()
    thread = preempter(clouds, provider, kinds, done)
    try:
        assert watcher.run(max_polls=2000) == FINISHED, said[-5:]
    finally:
        done.set()
        thread.join(timeout=30)
        final = (data_dir(clouds, provider) or tmp_path / "gone").joinpath("ckpt").read_text()
        box = cloud.get(cfg.box)
        if box is not None:
            cloud.terminate(box)
    assert final.split() == [str(STEPS), expected_state(STEPS)]  # as an uninterrupted run ends
    log = events.read("w")
    preempted = [e for e in log if e["kind"] == "preempted"]
    assert len(preempted) == len(kinds), [events.describe(e) for e in log]
    assert not clouds.runpod.live_pods() and not clouds.vast.instances
    # Recoveries: a kept instance is resumed, a removed one replaced by a new one on the volume.
    recovered = [e["kind"] for e in log if e["kind"] in ("resumed", "relaunched")]
    assert recovered == ["relaunched" if k == "remove" else "resumed" for k in kinds]
    assert len(runs.restarts) == len(kinds) + 1 and all(s and s > 0 for s in runs.restarts[1:])
    created = clouds.runpod.created if provider == "runpod" else clouds.vast.created
    assert len(created) == 1 + kinds.count("remove")  # nothing launched twice
    # Every instance's billed time is counted: each one launched has ended in the ledger's log.
    launched = [e["instance"] for e in log if e["kind"] == "launched"]
    ended = [e["instance"] for e in log if e["kind"] == "ended"]
    assert sorted(launched) == sorted(ended) == sorted(str(i) for i in created)
    # Each recovery restarted the run from its checkpoint, recorded with the step it resumed at.
    restarted = [e for e in log if e["kind"] == "restarted"]
    assert [e["steps"].get("count", 0) for e in restarted] == runs.restarts
    assert watcher.state.runs[0].finished


def test_final_state_equals_an_uninterrupted_run(clouds: Clouds, keypair: Path, tmp_path: Path) -> None:
    """Two preemptions on RunPod (one kept, one removed): the job's final state is the hash an
    uninterrupted run computes, and the volume holds it."""
    cfg = box_config(tmp_path, keypair, "runpod", resume_wait_minutes=0.5)
    cloud = provider_of(cfg)
    cloud.launch(cfg.box)
    runs, said = CounterRuns(cfg, cloud, steps=80), list[str]()
    watcher = watcher_for(cfg, cloud, runs, said)
    done = threading.Event()
    thread = preempter(clouds, "runpod", ["exit", "remove"], done)
    try:
        assert watcher.run(max_polls=2000) == FINISHED, said[-5:]
    finally:
        done.set()
        thread.join(timeout=30)
    volume = data_dir(clouds, "runpod")
    assert volume is not None
    step, state = (volume / "ckpt").read_text().split()
    assert (int(step), state) == (80, expected_state(80))
    assert len([e for e in events.read("w") if e["kind"] == "preempted"]) == 2
    box = cloud.get(cfg.box)
    assert box is not None
    cloud.terminate(box)


def test_budget_reached_mid_recovery_launches_nothing(clouds: Clouds, keypair: Path, tmp_path: Path) -> None:
    cfg = box_config(tmp_path, keypair, "runpod", budget_usd=1.0, resume_wait_minutes=0)
    cloud = provider_of(cfg)
    cloud.launch(cfg.box)
    said: list[str] = []
    watcher = Watcher(cfg, cloud, CounterRuns(cfg, cloud), say=said.append, poll_seconds=0.2, unreachable_seconds=3)
    assert watcher.tick() == "watching"
    ledger = container_ledger.read("runpod", "w")
    container_ledger.write("runpod", "w", container_ledger.Ledger(**{**ledger.__dict__, "spent_usd": 0.8}))
    (pod,) = clouds.runpod.live_pods()
    clouds.runpod.preempt(pod["id"], remove=True)  # while recovering, $0.20 left < one hour at $0.29
    assert watcher.run(max_polls=20) == BUDGET
    assert clouds.runpod.created == [pod["id"]] and not clouds.runpod.live_pods()
    (budget,) = [e for e in events.read("w") if e["kind"] == "budget"]
    assert "box.budget_usd $1.00 has $0.20 left" in budget["reason"]
    assert watcher.tick() == BUDGET and clouds.runpod.created == [pod["id"]]  # and it stays so


def test_budget_reached_while_running_stops_runs_with_a_checkpoint(
    clouds: Clouds, keypair: Path, tmp_path: Path
) -> None:
    cfg = box_config(tmp_path, keypair, "runpod", budget_usd=5.0)
    cloud = provider_of(cfg)
    cloud.launch(cfg.box)
    runs, said = CounterRuns(cfg, cloud, steps=100000), list[str]()
    watcher = watcher_for(cfg, cloud, runs, said)
    watcher.tick()  # starts the job
    volume = data_dir(clouds, "runpod")
    deadline = time.monotonic() + 30
    while checkpoint_step(volume) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    ledger = container_ledger.read("runpod", "w")
    container_ledger.write("runpod", "w", container_ledger.Ledger(**{**ledger.__dict__, "spent_usd": 5.0}))
    assert watcher.tick() == BUDGET
    assert not clouds.runpod.live_pods() and len(clouds.runpod.created) == 1
    assert checkpoint_step(volume) >= 3  # the checkpoint stays on the volume
    (budget,) = [e for e in events.read("w") if e["kind"] == "budget"]
    assert budget["runs"] == ["count"]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    result: subprocess.CompletedProcess[str] = lenslab(*args, env={"LENSLAB_CONFIG": str(cwd / "lenslab.toml")},
                                                       timeout=60)  # fmt: skip
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    return result


def wait_for(what: Callable[[], bool], seconds: float, why: str) -> None:
    deadline = time.monotonic() + seconds
    while not what():
        assert time.monotonic() < deadline, why
        time.sleep(0.05)


def test_sigkilled_detached_watcher_restarted_launches_nothing_twice(
    clouds: Clouds, keypair: Path, tmp_path: Path
) -> None:
    (tmp_path / "lenslab.toml").write_text(
        f'[box]\nname = "w"\nprovider = "runpod"\nuser = "debian"\nidentity_file = "{keypair}"\n'
        'gpu_types = ["4090"]\ninterruptible = true\nresume_wait_minutes = 0\nbudget_usd = 50\n'
    )
    cfg = config.load(tmp_path / "lenslab.toml")
    cloud = provider_of(cfg)
    cloud.launch(cfg.box)
    started = run_cli("watch", "--detach", "--poll-seconds", "0.3", "--json", cwd=tmp_path)
    assert started.returncode == 0, started.stderr
    pid = json.loads(started.stdout)["pid"]
    again = run_cli("watch", "--detach", cwd=tmp_path)  # one watcher per box
    assert again.returncode != 0 and "already running" in again.stderr
    wait_for(lambda: bool(states.load("w", "runpod").instance), 20, "the watcher never saw the pod")
    (pod,) = clouds.runpod.live_pods()
    clouds.runpod.boot_seconds = 4.0  # the next pod shows no SSH port for 4 s: the watcher waits for it
    clouds.runpod.preempt(pod["id"], remove=True)
    wait_for(lambda: len(clouds.runpod.created) == 2, 30, "no relaunch")
    os.kill(pid, signal.SIGKILL)  # in the middle of the relaunch: created, still booting
    assert not any(e["kind"] == "relaunched" for e in events.read("w"))
    wait_for(lambda: not states.is_locked("w"), 10, "the lock outlived its watcher")
    restarted = run_cli("watch", "--detach", "--poll-seconds", "0.3", "--json", cwd=tmp_path)
    assert restarted.returncode == 0, restarted.stderr
    wait_for(lambda: any(e["kind"] == "relaunched" for e in events.read("w")), 60,
             states.log_path("w").read_text()[-2000:])  # fmt: skip
    assert len(clouds.runpod.created) == 2 and len(clouds.runpod.live_pods()) == 1  # launched once
    stopped = run_cli("watch", "--stop", cwd=tmp_path)
    assert stopped.returncode == 0 and "stopped the watcher" in stopped.stdout
    assert not states.is_locked("w")
    down = run_cli("down", cwd=tmp_path)
    assert down.returncode == 0, down.stderr


def test_a_preemption_during_the_relaunch_is_recovered_too(clouds: Clouds, keypair: Path, tmp_path: Path) -> None:
    cfg = box_config(tmp_path, keypair, "runpod", resume_wait_minutes=0)
    cloud = provider_of(cfg)
    cloud.launch(cfg.box)
    said: list[str] = []
    watcher = Watcher(cfg, cloud, CounterRuns(cfg, cloud), say=said.append, poll_seconds=0.2, unreachable_seconds=3)
    assert watcher.tick() == "watching"
    (first,) = clouds.runpod.live_pods()
    clouds.runpod.boot_seconds = 2.0  # the new pod boots for 2 s: long enough to be taken back meanwhile

    def take_back_the_next_one() -> None:
        wait_for(lambda: len(clouds.runpod.created) == 2, 30, "no relaunch")
        clouds.runpod.preempt(clouds.runpod.created[1], remove=True)

    thread = threading.Thread(target=take_back_the_next_one, daemon=True)
    thread.start()
    clouds.runpod.preempt(first["id"], remove=True)
    for _ in range(200):
        if watcher.tick() == "watching" and any(e["kind"] == "relaunched" for e in events.read("w")):
            break
        time.sleep(watcher.pause())
    thread.join(timeout=30)
    assert any("relaunch failed" in line and "vanished" in line for line in said), said
    (live,) = clouds.runpod.live_pods()
    assert clouds.runpod.created == [first["id"], clouds.runpod.created[1], live["id"]]
    box = cloud.get(cfg.box)
    assert box is not None
    cloud.terminate(box)
