"""The ``[box]`` fields of provider = "slurm", as sbatch reads them.

``lenslab.config`` types and shapes them (partition, account, qos, gpus_per_run, time_limit,
apptainer) and refuses them for a provider without a scheduler; what is checked here is what is
this provider's to say: Apptainer is not supported yet, and runs never use a Docker engine."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lenslab.config import BoxConfig


def problem(cfg: BoxConfig) -> str | None:
    """What is wrong with a Slurm box's own fields, or None."""
    if cfg.apptainer is not None:
        return (
            "apptainer is not supported yet: runs use the venv `lenslab up` installs on the shared root; "
            "remove box.apptainer"
        )
    if cfg.engine != "docker":
        return 'engine is not for provider "slurm": runs go to Slurm; remove box.engine'
    return None


def time_limit_seconds(text: str | None) -> int | None:
    """``time_limit`` in seconds (None: no limit), as sbatch reads its --time."""
    if text is None or text in ("UNLIMITED", "INFINITE"):
        return None
    days = 0
    if "-" in text:
        head, text = text.split("-", 1)
        days = int(head)
        parts = [int(p) for p in text.split(":")]
        hours, minutes, seconds = [*parts, 0, 0][:3]
    else:
        parts = [int(p) for p in text.split(":")]
        if len(parts) == 1:
            hours, minutes, seconds = 0, parts[0], 0
        elif len(parts) == 2:
            hours, minutes, seconds = 0, parts[0], parts[1]
        else:
            hours, minutes, seconds = parts
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds
