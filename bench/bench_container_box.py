"""Benchmark `lenslab up` and `lenslab status` on a ready container box (RunPod, emulated).

The box is what a RunPod pod is: a container of lenslab's own image running `lenslab-box serve`
(sshd as `lab`, no Docker engine), launched through the RunPod API emulator, its network volume a
host directory. After one `lenslab up --yes` (the launch, not timed), each command is run
repeatedly as a fresh process, as a user would. The baseline measured in the same run is a
plain `ssh` of the same command-free login through the generated ssh config (`ssh ALIAS true`):
the floor for anything that has to reach the box.

Targets: `up` on a ready box <= 3 s; `status` <= 0.5 s.

With ``--stock`` the pod runs the stand-in for RunPod's stock PyTorch image instead
(``image = "stock"``: lenslab installed by the first `up` into a venv on the volume; the timed
`up`s find it ready).

Usage: python bench/bench_container_box.py [--runs N] [--stock]   (needs Docker; builds lenslab's image once)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "image"))
import imagekit  # noqa: E402  (tests/image is not a package)

from tests.support.instance_runner import InstanceRunner  # noqa: E402
from tests.support.runpod_emulator import RunPodEmulator  # noqa: E402

LENSLAB = str(Path(sys.executable).with_name("lenslab"))
TARGETS = {"up": 3.0, "status": 0.5}


def build_image(work: Path) -> str:
    import docker

    client = docker.from_env()
    base_id = imagekit.ensure_base_image(client)
    wheel = imagekit.torch_wheel()
    context = imagekit.make_context(work / "context", wheel)
    args = {"BASE_IMAGE": imagekit.BASE_IMAGE, "TORCH_SPEC": imagekit.torch_spec(wheel)}
    tag: str = imagekit.build_cached(client, context, args, base_id).tag
    return tag


def stock_image(work: Path, lenslab_image: str) -> str:
    import docker

    tag: str = imagekit.stock_image(docker.from_env(), lenslab_image, work / "stock")
    return tag


def median_seconds(cmd: list[str], runs: int, env: dict[str, str], cwd: Path) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(cmd, env=env, cwd=cwd, check=True, capture_output=True, timeout=120)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--stock", action="store_true", help='image = "stock": lenslab in a venv on the volume')
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lenslab-bench-") as tmp:
        work = Path(tmp)
        image = build_image(work)
        images = {"lenslab:latest": image}
        if args.stock:
            from lenslab.providers.runpod.provider import RunPodProvider

            images[RunPodProvider.stock_image] = stock_image(work, image)
        runner = InstanceRunner(f"lenslab-bench={uuid.uuid4().hex[:12]}", images=images)
        emulator = RunPodEmulator(work / "volumes").start()
        emulator.runner = runner
        home, project = work / "home", work / "project"
        home.mkdir()
        project.mkdir()
        env = {
            **os.environ, "HOME": str(home), "RUNPOD_API_KEY": emulator.api_key,
            "RUNPOD_API_URL": emulator.graphql_url, "RUNPOD_REST_URL": emulator.rest_url,
            "VAST_API_KEY": "", "LAMBDA_API_KEY": "",
        }  # fmt: skip
        env.pop("XDG_STATE_HOME", None)
        try:
            subprocess.run([LENSLAB, "init", "--name", "bench", "--provider", "runpod"], env=env, cwd=project,
                           check=True, capture_output=True)  # fmt: skip
            toml = project / "lenslab.toml"
            text = toml.read_text() + 'gpu_types = ["4090"]\nmin_free_gb = 0\n'
            if args.stock:
                text = text.replace('\nimage = "lenslab:latest"\n', '\nimage = "stock"\n', 1)
                text += f'build_context = "{ROOT}"\n'
            toml.write_text(text)
            subprocess.run([LENSLAB, "up", "--yes"], env=env, cwd=project, check=True, capture_output=True, timeout=600)
            ssh_config = home / ".ssh" / "lenslab" / "config"
            figures = {
                "ssh ALIAS true (baseline)": median_seconds(
                    ["ssh", "-F", str(ssh_config), "lenslab-bench", "true"], args.runs, env, project
                ),
                "up": median_seconds([LENSLAB, "up"], args.runs, env, project),
                "status": median_seconds([LENSLAB, "status"], args.runs, env, project),
            }
            subprocess.run([LENSLAB, "down", "--yes"], env=env, cwd=project, check=True, capture_output=True,
                           timeout=600)  # fmt: skip
        finally:
            runner.close()
            emulator.stop()
            if args.stock:
                import docker

                imagekit.remove_stock_image(docker.from_env(), images[RunPodProvider.stock_image])
    baseline = figures["ssh ALIAS true (baseline)"]
    kind = "the stock image, lenslab in a venv on the volume" if args.stock else "lenslab's image"
    print(f"median of {args.runs} runs, container box (RunPod emulated, {kind})")
    for name, seconds in figures.items():
        line = f"  {name:28s} {seconds:6.3f} s  {seconds / baseline:5.2f}x ssh"
        if name in TARGETS:
            line += f"  target <= {TARGETS[name]} s: {'met' if seconds <= TARGETS[name] else 'NOT met'}"
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
