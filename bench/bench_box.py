"""Benchmark detached training on a box against the targets in its design.

Measures, over loopback on a fresh-VM box (tests/services/start.sh) with lenslab's image
already built (the first `lenslab up` here builds or reuses it and is not timed):
  - start: from `lenslab train` returning to the first training step on the box (status.json
    reports step >= 1); target <= 5 s;
  - resume: from the training container's process being killed (SIGKILL, as a crash or the OOM
    killer would) to its first resumed step (Docker's restart policy brings it back, and
    status.json reports a step past the checkpoint it resumed from); target <= 10 s.
The image is built from the repository with the local Debian base and the CPU torch wheel, as
the image tests do. HOME is a temporary directory, so the user's ~/.ssh is never touched.

Usage: python bench/bench_box.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "lenslab"))
TARGETS = {"start": 5.0, "resume": 10.0}


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="lenslab-bench-box-"))
    os.environ["HOME"] = str(tmp / "home")
    (tmp / "home").mkdir()
    import labkit
    from lenslab_testkit import free_port, lenslab, unique

    from lenslab import sshconfig

    key = sshconfig.ensure_keypair()
    root = labkit.persistent_root(tmp / "persist")
    project = tmp / "project"
    project.mkdir()
    os.chdir(project)
    box = unique("bench")
    context = labkit.imagekit.make_context(tmp / "context", labkit.imagekit.torch_wheel())
    vm = labkit.start_box(Path(str(key) + ".pub").read_text().strip(), root)
    try:
        labkit.write_lab_config(project, vm, box, root, context, free_port())
        up = lenslab("up", timeout=1800)
        if up.returncode != 0:
            raise SystemExit(f"lenslab up failed: {up.stderr}")
        run = unique("bench")
        run_file = labkit.tiny_run(project / "run", training_tokens=400_000, checkpoint_every_tokens=20_000)
        started = lenslab("train", str(run_file), "--name", run)
        returned = time.monotonic()
        if started.returncode != 0:
            raise SystemExit(f"lenslab train failed: {started.stderr}")
        labkit.wait_for("the first step", lambda: labkit.read_status(root, run).get("step", 0) >= 1, 120, 0.02)
        start_s = time.monotonic() - returned

        labkit.wait_for("a checkpoint", lambda: labkit.read_status(root, run).get("last_checkpoint"), 120, 0.05)
        name = f"lenslab-train-{run}"
        subprocess.run(["kill", "-9", str(labkit.container_state(name)["Pid"])], check=True)
        killed = time.monotonic()

        def resumed_step() -> bool:
            status = labkit.read_status(root, run)
            base = status.get("resumed_from_step")
            return base is not None and status.get("step", 0) > base

        labkit.wait_for("the first resumed step", resumed_step, 120, 0.02)
        resume_s = time.monotonic() - killed
    finally:
        labkit.remove_containers(f"lenslab.box={box}")
        vm.stop()
    for label, value in (("start", start_s), ("resume", resume_s)):
        verdict = "ok" if value <= TARGETS[label] else "OVER TARGET"
        print(f"{label:7s} {value:6.2f} s   (target <= {TARGETS[label]:.0f} s)  {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
