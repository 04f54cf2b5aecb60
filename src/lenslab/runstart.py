"""Starting a run on the box, the one way: ``lenslab train`` and the watcher's restarts alike.

A run restarted after a preemption must be started exactly as ``lenslab train`` started it:
with the box's mirror written into its run file (unless it names its own) and the mirror's
credentials beside it, or on a fresh disk it would train from step 0 and mirror nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lenslab import runmirror

if TYPE_CHECKING:
    from lenslab.config import BoxConfig
    from lenslab.remote.labs import LabBackend
    from lenslab.runfile import RunFile


def start_run(lab: LabBackend, run: RunFile, box: BoxConfig) -> tuple[RunFile, str]:
    """Start ``run`` on the lab's box with the box's mirror and its credentials; the run file as
    started and what runs it. Everything is checked here before anything is uploaded."""
    run = prepare_run(lab, run, box)
    return run, lab.start_run(run)


def prepare_run(lab: LabBackend, run: RunFile, box: BoxConfig) -> RunFile:
    """``run`` with the box's mirror, its credentials already beside it on the box: what is
    started (alone, or as one task of a sweep)."""
    from lenslab.contract import MIRROR_ENV_FILE
    from lenslab.remote.training import Paths

    run = runmirror.with_box_mirror(run, box)  # [box] mirror, unless the run names its own
    secrets = runmirror.mirror_env(box)
    if secrets is not None:
        lab.runner.put(secrets, f"{Paths(lab.lab.root, run.name).config_dir}/{MIRROR_ENV_FILE}", mode=0o600)
    return run
