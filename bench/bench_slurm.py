"""Benchmark lenslab on a Slurm cluster against the targets in its design.

Measures, on the test cluster (tests/support/slurm_cluster.py: a controller that is the SSH
login node on 127.0.0.1 and two compute nodes, in containers on this machine), after `lenslab up`
(not timed):
  - submit: `lenslab train` of an 8-run sweep (one job array), end to end; target <= 3 s; also
    with the CLI alone (as on a laptop without lenslab-workspace: the light run-file check), and
    split into checking the run files, connecting, and the one round trip that submits;
  - runs: `lenslab runs` over that sweep (median of 3); target <= 1 s;
  - node loss: from a compute node killed mid-run to the task's first resumed training step on
    the other node (status.json reports a step past the checkpoint it resumed from), split into
    Slurm's own detection (the node marked down: SlurmdTimeout and the controller's ping), the
    requeue until the batch script starts again, and the trainer's start to its first step.
The times include the CLI's own start (Python imports) and the SSH handshake, as a user sees them.
HOME is a temporary directory, so the user's ~/.ssh is never touched.

Usage: python bench/bench_slurm.py
"""

from __future__ import annotations

import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TARGETS = {"submit": 3.0, "runs": 1.0}


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="lenslab-bench-slurm-"))
    os.environ["HOME"] = str(tmp / "home")
    (tmp / "home").mkdir()
    from lenslab import sshconfig
    from tests.slurm.test_slurm_train import events, run_files, shared, status, wait_for
    from tests.support.slurm_cluster import SlurmCluster, lenslab, lenslab_toml, slurm_image, snapshot_sources

    key = sshconfig.ensure_keypair()
    cluster = SlurmCluster(
        image=slurm_image(tmp / "build").tag,
        authorized_key=Path(str(key) + ".pub").read_text().strip(),
        host_shared=tmp / "shared",
        config_dir=tmp / "cluster",
    )
    project = tmp / "project"
    project.mkdir()
    os.chdir(project)
    try:
        cluster.start()
        (project / "lenslab.toml").write_text(lenslab_toml(cluster, snapshot_sources(tmp / "sources")))
        up = lenslab(project, "up", timeout=1800)
        if up.returncode != 0:
            raise SystemExit(f"lenslab up failed: {up.stderr}")
        names = [f"s{i}" for i in range(8)]
        files = run_files(project / "sweep", names, tokens=40_000, every=20_000)
        began = time.monotonic()
        submitted = lenslab(project, "train", *map(str, files))
        submit_s = time.monotonic() - began
        if submitted.returncode != 0:
            raise SystemExit(f"lenslab train failed: {submitted.stderr}")
        runs_s = []
        for _ in range(3):
            began = time.monotonic()
            listed = lenslab(project, "runs", "--json")
            runs_s.append(time.monotonic() - began)
            if listed.returncode != 0 or len(json.loads(listed.stdout)["runs"]) < 8:
                raise SystemExit(f"lenslab runs failed: {listed.stderr or listed.stdout}")
        cluster.exec("ctl", ["scancel", "--user", cluster.user], user=cluster.user)
        light_s = cli_alone(project, run_files(project / "light", [f"l{i}" for i in range(8)], 40_000, 20_000))
        cluster.exec("ctl", ["scancel", "--user", cluster.user], user=cluster.user)
        parts = submit_parts(project, cluster, run_files)
        cluster.wait_idle(120)
        loss = node_loss(cluster, project, lenslab, run_files, events, status, wait_for)
        print(f"slurm root on the host: {shared(cluster)}")
    finally:
        cluster.stop()
    report(submit_s, statistics.median(runs_s), loss, slurmd_timeout(cluster))
    print(f"submit, CLI alone (no lenslab-workspace beside it, as on a laptop): {light_s:.2f} s  target <= "
          f"{TARGETS['submit']:.0f} s  ratio {light_s / TARGETS['submit']:.2f}")  # fmt: skip
    print(f"  of submit: checking the 8 run files {parts['check']:.2f} s (a fresh process), connecting "
          f"{parts['connect']:.2f} s, uploading + sbatch + records {parts['submit']:.2f} s")  # fmt: skip
    return 0


def cli_alone(project: Path, files: list[Path]) -> float:
    """`lenslab train` of a sweep as on a laptop with the CLI alone (lenslab-workspace hidden, so
    run files get the CLI's light check instead of SAELens's validator)."""
    import subprocess

    code = "import sys; sys.modules['lenslab_workspace'] = None; from lenslab.cli import main; sys.exit(main())"
    began = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code, "train", *map(str, files)], cwd=project,
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"lenslab train (CLI alone) failed: {done.stderr}")
    return time.monotonic() - began


def submit_parts(project, cluster, run_files) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """What the CLI's submission time is made of: checking 8 run files in a fresh process (with
    lenslab-workspace installed here, its full validator: SAELens imports), and connecting,
    uploading and submitting (open_lab + start_runs, the run files already checked)."""
    import subprocess

    from lenslab import config, runfile
    from lenslab.remote.labs import open_lab

    files = run_files(project / "parts", [f"p{i}" for i in range(8)], tokens=40_000, every=20_000)
    began = time.monotonic()
    paths = list(map(str, files))
    code = f"from pathlib import Path; from lenslab import runfile; [runfile.load(Path(p)) for p in {paths!r}]"
    subprocess.run([sys.executable, "-c", code], check=True)
    check_s = time.monotonic() - began
    loaded = [runfile.load(path) for path in files]
    began = time.monotonic()
    with open_lab(config.load(project / "lenslab.toml")) as lab:
        connected = time.monotonic()
        lab.start_runs(loaded)  # type: ignore[attr-defined]
    done = time.monotonic()
    cluster.exec("ctl", ["scancel", "--user", cluster.user], user=cluster.user)
    return {"check": check_s, "connect": connected - began, "submit": done - connected}


def node_loss(cluster, project, lenslab, run_files, events, status, wait_for) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Kill the node a run trains on, right after a checkpoint; the phases until its first resumed step."""
    (run_file,) = run_files(project / "loss", ["loss"], tokens=400_000, every=16_000)
    if lenslab(project, "train", str(run_file)).returncode != 0:
        raise SystemExit("lenslab train of the node-loss run failed")
    wait_for("a checkpoint", lambda: (status(cluster, "loss").get("last_checkpoint") or {}).get("step"), 600, 0.05)
    node = events(cluster, "loss")[-1][2]
    killed = time.monotonic()
    cluster.kill_node(node)
    try:
        wait_for("the node marked down", lambda: re.search(r"down|fail", cluster.node_states().get(node, "")), 300, 0.2)
        detected = time.monotonic()
        wait_for("the task started again", lambda: len([e for e in events(cluster, "loss") if e[0] == "start"]) > 1,
                 600, 0.1)  # fmt: skip
        restarted = time.monotonic()

        def resumed_step() -> bool:
            now = status(cluster, "loss")
            base = now.get("resumed_from_step")
            return base is not None and (now.get("step") or 0) > base

        wait_for("the first resumed step", resumed_step, 600, 0.05)
        stepped = time.monotonic()
    finally:
        cluster.start_node(node)
    lenslab(project, "stop", "loss", timeout=300)
    return {"detect": detected - killed, "requeue": restarted - detected, "trainer": stepped - restarted,
            "total": stepped - killed}  # fmt: skip


def slurmd_timeout(cluster) -> str:  # type: ignore[no-untyped-def]
    text = (Path(cluster.config_dir) / "slurm.conf").read_text()
    match = re.search(r"^SlurmdTimeout=(\d+)", text, re.M)
    return f"{match[1]} s" if match else "default"


def report(submit_s: float, runs_s: float, loss: dict[str, float], timeout: str) -> None:
    for what, seconds in (("submit", submit_s), ("runs", runs_s)):
        target = TARGETS[what]
        verdict = "ok" if seconds <= target else "OVER TARGET"
        print(f"{what:<8} {seconds:6.2f} s  target <= {target:.0f} s  ratio {seconds / target:.2f}  {verdict}")
    print(f"node loss -> first resumed step: {loss['total']:.1f} s")
    print(f"  Slurm's detection (node marked down; SlurmdTimeout = {timeout}): {loss['detect']:.1f} s")
    print(f"  requeue until the batch script starts again: {loss['requeue']:.1f} s")
    print(f"  trainer start to its first resumed step: {loss['trainer']:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
