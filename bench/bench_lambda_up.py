"""`lenslab up --provider lambda` against the Lambda API emulator with instant boot.

Measures lenslab's own overhead from the command to "ready" (the emulator boots instances at
once; each instance is a fresh-VM container with sshd on loopback), and how it splits between
the API calls (finding/launching the box), waiting for SSH, and the bootstrap. Target: <= 20 s.
A second `up` on the running box is measured too.

Usage: python bench/bench_lambda_up.py [--runs N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_cli import free_port, start_box  # noqa: E402

from tests.support.lambda_emulator import LambdaEmulator  # noqa: E402

LENSLAB = str(Path(sys.executable).with_name("lenslab"))
API_KEY = "bench-key"
TARGET_SECONDS = 20.0


def one_run(tmp: Path) -> tuple[float, dict[str, float], float]:
    """(seconds to ready minus the emulated boot, per-step timings, seconds of a second up)."""
    home, project = tmp / "home", tmp / "project"
    home.mkdir()
    project.mkdir()
    env = {**os.environ, "HOME": str(home), "LAMBDA_API_KEY": API_KEY}
    subprocess.run([LENSLAB, "init", "--name", "bench", "--provider", "lambda"], cwd=project, env=env, check=True,
                   capture_output=True)  # fmt: skip
    port = free_port()
    (project / "lenslab.toml").write_text(
        f'[box]\nname = "bench"\nprovider = "lambda"\nuser = "debian"\nport = {port}\n'
    )
    pubkey = (home / ".ssh" / "lenslab" / "id_ed25519.pub").read_text().strip()
    emulator = LambdaEmulator(tmp / "fs", api_key=API_KEY).start()
    emulator.launch_interval = 0.0
    containers: list[str] = []
    boot: list[float] = []

    def launch(instance: dict[str, Any]) -> str:
        # The emulated machine's boot (a container with sshd), not lenslab's work: timed apart.
        start = time.perf_counter()
        containers.append(start_box(pubkey, port))
        boot.append(time.perf_counter() - start)
        return "127.0.0.1"

    emulator.on_launch = launch
    env["LAMBDA_API_URL"] = emulator.url
    try:
        start = time.perf_counter()
        out = subprocess.run([LENSLAB, "up", "--yes", "--json"], cwd=project, env=env, capture_output=True, text=True)
        total = time.perf_counter() - start - sum(boot)
        if out.returncode != 0:
            raise SystemExit(f"lenslab up failed: {out.stderr.strip()}")
        timings = json.loads(out.stdout)["timings"]
        timings["emulated boot"] = sum(boot)
        start = time.perf_counter()
        subprocess.run([LENSLAB, "up", "--yes", "--json"], cwd=project, env=env, check=True, capture_output=True)
        again = time.perf_counter() - start
        return total, timings, again
    finally:
        emulator.stop()
        for container in containers:
            subprocess.run(["docker", "rm", "-f", container], capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    totals, agains, splits = [], [], []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            total, timings, again = one_run(Path(tmp))
        totals.append(total)
        agains.append(again)
        splits.append(timings)
    print(f"lenslab up --provider lambda, emulator with instant boot (median of {args.runs})")
    print(
        f"  command to ready, emulated boot excluded: {statistics.median(totals):6.2f} s"
        f"   target <= {TARGET_SECONDS:.0f} s"
    )
    boots = [t["emulated boot"] for t in splits]
    finding = [v for t in splits for k, v in t.items() if k.startswith("finding box")]
    print(f"    API calls (find, plan, launch, poll)  : {statistics.median(finding) - statistics.median(boots):6.2f} s")
    for name in splits[0]:
        if not name.startswith("finding box") and name != "emulated boot":
            label = "SSH wait" if name.startswith("connecting") else name
            print(f"    {label[:38]:38}: {statistics.median(t.get(name, 0.0) for t in splits):6.2f} s")
    print(f"  (emulated boot, not counted: {statistics.median(boots):.2f} s)")
    print(f"  again on the running box: {statistics.median(agains):6.2f} s")


if __name__ == "__main__":
    main()
