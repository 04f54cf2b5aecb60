"""Benchmark `lenslab watch` on a training run: preemption -> first resumed training step, and
the training work each preemption lost.

The RunPod emulator (tests/support) runs on 127.0.0.1; its pods are real containers of lenslab's
image (built from this checkout as the image tests build it), their network volume a host
directory. A tiny run (workspace/configs/tiny.toml: a checkpoint every 10 training seconds) is
started with `lenslab up --cheapest --yes` and `lenslab train`, kept going by `lenslab watch
--detach` (its default 15 s poll unless --poll), and its spot pod is preempted at random moments
of training, alternately kept by RunPod (bid back) and removed (a new pod on the same volume).

For each preemption, read from the run's status.json and checkpoint manifests on the volume:
- recovery: from the preemption to the first status the restarted trainer wrote at a training
  step past the one it resumed from (its ``updated_at``). The emulated boot delay is 0 s (the
  emulator's ``boot_seconds``), so nothing is subtracted: the real container start is included.
  Target: <= 90 s.
- work lost: the training seconds the resumed run does again, from the checkpoint it resumed
  from (its manifest's ``created_at``) to the preemption; 0 when the trainer saved a checkpoint in
  the grace period (the emulator stops a pod with 2 s of grace; --no-grace kills it outright,
  the worst case). Target: <= checkpoint_every_seconds.

Usage: python bench/bench_watch_training.py [--preemptions N] [--poll SECONDS] [--tokens N] [--no-grace]
(needs Docker; takes a few minutes on a small machine)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "lenslab"))
sys.path.insert(0, str(ROOT / "tests" / "image"))
import imagekit  # noqa: E402  (tests/image is not a package)
from lenslab_testkit import LABEL, LENSLAB  # noqa: E402

from tests.support.instance_runner import InstanceRunner  # noqa: E402
from tests.support.runpod_emulator import RunPodEmulator  # noqa: E402

TARGET_RECOVERY_SECONDS = 90.0
TINY = ROOT / "workspace" / "configs" / "tiny.toml"
BOX = "bench-train"


def build_image(work: Path) -> str:
    import docker as sdk

    client = sdk.from_env()
    base_id = imagekit.ensure_base_image(client)
    wheel = imagekit.torch_wheel()
    context = imagekit.make_context(work / "context", wheel)
    args = {"BASE_IMAGE": imagekit.BASE_IMAGE, "TORCH_SPEC": imagekit.torch_spec(wheel)}
    tag: str = imagekit.build_cached(client, context, args, base_id).tag
    return tag


def cli(project: Path, *args: str, timeout: float = 600) -> str:
    done = subprocess.run([LENSLAB, *args], cwd=project, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise SystemExit(f"lenslab {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def run_file(project: Path, tokens: int) -> tuple[Path, float]:
    """tiny.toml with ``tokens`` to train, its dataset beside it; its checkpoint_every_seconds."""
    text = re.sub(r"^training_tokens = .*$", f"training_tokens = {tokens}", TINY.read_text(), flags=re.M)
    every = float(re.search(r"^checkpoint_every_seconds = (\S+)", text, flags=re.M).group(1))  # type: ignore[union-attr]
    dest = project / "run"
    shutil.copytree(TINY.parent / "data", dest / "data")
    (dest / "run.toml").write_text(text)
    return dest / "run.toml", every


def status(volume: Path) -> dict[str, Any]:
    try:
        found: dict[str, Any] = json.loads((volume / "runs" / "r" / "status.json").read_text())
        return found
    except (OSError, ValueError):
        return {}


def committed_at(volume: Path, step: int) -> float | None:
    """When the checkpoint of ``step`` was committed (its manifest's created_at)."""
    try:
        manifest = json.loads(
            (volume / "runs" / "r" / "checkpoints" / f"step-{step:09d}" / "manifest.json").read_text()
        )
        return float(manifest["created_at"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def wait(what: str, check: Any, timeout: float = 900) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {what}")


def training_past_a_checkpoint(volume: Path, since: float) -> bool:
    """The run trains, started after ``since``, with a checkpoint of this start committed."""
    st = status(volume)
    if st.get("state") == "finished":
        raise SystemExit("the run finished before every preemption was made: give it more --tokens")
    checkpoint = (st.get("last_checkpoint") or {}).get("step")
    return st.get("state") == "running" and (st.get("started_at") or 0) > since and isinstance(checkpoint, int)


def preempt_once(
    cloud: RunPodEmulator, volume: Path, remove: bool, every: float, since: float, grace: bool
) -> tuple[float, float]:
    """One preemption at a random moment of training: (recovery seconds, training seconds lost).
    Without ``grace`` the pod's container is killed first (SIGKILL: no checkpoint on the way out)."""
    wait("training past a checkpoint", lambda: training_past_a_checkpoint(volume, since))
    time.sleep(random.uniform(0.0, every))  # a random moment of a checkpoint interval
    (pod,) = [p for p in cloud.live_pods() if p["desiredStatus"] == "RUNNING"]
    preempted = time.time()
    if not grace and cloud.runner is not None:
        subprocess.run(["docker", "kill", cloud.runner.containers[pod["id"]]], capture_output=True, check=False)
    cloud.preempt(pod["id"], remove=remove)

    def resumed_step() -> dict[str, Any] | None:
        st = status(volume)
        start, step, resumed = st.get("started_at") or 0, st.get("step"), st.get("resumed_from_step")
        if start <= preempted or st.get("state") != "running":
            return None  # still the preempted trainer's status, or not training yet
        return st if isinstance(step, int) and isinstance(resumed, int) and step > resumed else None

    st = wait("the first resumed training step", resumed_step)
    recovery = float(st["updated_at"]) - preempted - cloud.boot_seconds
    committed = committed_at(volume, int(st["resumed_from_step"]))
    lost = max(0.0, preempted - committed) if committed is not None else float("nan")
    return recovery, lost


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preemptions", type=int, default=4)
    parser.add_argument("--poll", type=float, default=15.0, help="the watcher's poll (default: its own, 15 s)")
    parser.add_argument("--tokens", type=int, default=3_000_000, help="the tiny run's training tokens")
    parser.add_argument("--no-grace", action="store_true", help="kill the pod outright (no save on SIGTERM)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ["HOME"] = str(work / "home")
        (work / "home").mkdir()
        os.environ.pop("XDG_STATE_HOME", None)
        from lenslab import sshconfig

        sshconfig.ensure_keypair()
        runner = InstanceRunner(LABEL, images={"lenslab:latest": build_image(work)})
        cloud = RunPodEmulator(work / "volumes").start()
        cloud.runner = runner
        os.environ.update(RUNPOD_API_KEY=cloud.api_key, RUNPOD_API_URL=cloud.graphql_url,
                          RUNPOD_REST_URL=cloud.rest_url, VAST_API_KEY="", LAMBDA_API_KEY="")  # fmt: skip
        project = work / "project"
        project.mkdir()
        (project / "lenslab.toml").write_text(
            f'[box]\nname = "{BOX}"\nprovider = "runpod"\ngpu_types = ["4090"]\ninterruptible = true\n'
            "resume_wait_minutes = 1\nmin_free_gb = 0\nbudget_usd = 50\n"
        )
        path, every = run_file(project, args.tokens)
        try:
            cli(project, "up", "--cheapest", "--yes")
            volume = Path(next(iter(cloud.volumes.values()))["_directory"])
            cli(project, "train", str(path), "--name", "r")
            cli(project, "watch", "--detach", "--poll-seconds", str(args.poll))
            results, since = [], 0.0
            for index in range(args.preemptions):
                remove = index % 2 == 1
                kind = "removed, new pod on the volume" if remove else "kept, bid back"
                started = time.time()
                recovery, lost = preempt_once(cloud, volume, remove, every, since, not args.no_grace)
                since = started
                results.append((recovery, lost))
                print(f"preemption {index + 1} ({kind:30s}): first resumed step after {recovery:5.1f} s, "
                      f"work lost {lost:4.1f} training s", flush=True)  # fmt: skip
            worst = max(r for r, _ in results)
            most = max(lost for _, lost in results)
            verdict = "ok" if worst <= TARGET_RECOVERY_SECONDS else "OVER"
            print(f"worst recovery: {worst:.1f} s (target <= {TARGET_RECOVERY_SECONDS:.0f} s, poll {args.poll:g} s, "
                  f"emulated boot {cloud.boot_seconds:g} s excluded): {verdict}")  # fmt: skip
            print(f"most work lost: {most:.1f} training s (target <= checkpoint_every_seconds = {every:g} s): "
                  f"{'ok' if most <= every else 'OVER'}")  # fmt: skip
        finally:
            subprocess.run([LENSLAB, "watch", "--stop"], cwd=project, capture_output=True, timeout=60, check=False)
            subprocess.run([LENSLAB, "down"], cwd=project, capture_output=True, timeout=300, check=False)
            for pod in list(cloud.pods.values()):
                cloud._remove(pod)
            runner.close()
            cloud.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
