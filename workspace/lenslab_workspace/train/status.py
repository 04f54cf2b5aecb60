"""``status.json``: what the run is doing, for people and for the laptop side.

Schema (version 1), every key always present:

    {
      "schema": 1,
      "name": str,                   run name
      "state": "starting" | "running" | "finished" | "interrupted" | "failed",
      "step": int,                   training steps done
      "tokens_done": int,            activations (tokens) trained on
      "tokens_total": int,           training_tokens of the run
      "tokens_per_second": float | null,   over the last 30 s (progress.RateWindow)
      "eta_seconds": float | null,
      "losses": {str: float},        the latest step's losses (SAELens names)
      "last_checkpoint": {"step": int, "tokens": int, "path": str, "time": float} | null,
      "resumed_from_step": int | null,
      "message": str | null,         why it failed or was interrupted
      "mirror": {"url": str, "last_uploaded": str | null, "consecutive_failures": int,
                 "errors_total": int, "last_error": str | null} | null,   null without a mirror
      "pid": int, "hostname": str,
      "boot_id": str | null,         /proc/sys/kernel/random/boot_id of the machine
      "pid_start_ticks": int | null, the process's start time (field 22 of /proc/<pid>/stat)
      "started_at": float, "updated_at": float    unix seconds
    }

A group run (several SAEs from one model pass) has the same keys, the counters and losses
being the group's (its SAEs step in lockstep; ``losses`` are the first SAE's), plus one more:

      "saes": [{"name": str, "architecture": str, "hook_name": str, "d_sae": int,
                "losses": {str: float}}, ...]     one entry per SAE, in the run file's order

It is replaced atomically (write aside, fsync, rename), so a reader never sees half a file.

A launch writes it ("starting") as soon as its run directory exists, and a launch that then
fails before or during training leaves ``"state": "failed"`` with the one-line reason in
``message``. A launch refused before anything is written (a bad run file, a missing device,
a changed config: exit 2) leaves no status: a new run gets no directory at all, and an
existing run's directory, status included, stays as it was; the one line on stderr (the
container's log) is the record.

A trainer killed with SIGKILL (or with its machine) leaves ``"state": "running"``. To tell a
live run from a dead one, evaluate ``is_alive(status)`` where the trainer ran (on the box, in
the same PID namespace, i.e. inside the run's container when it runs in one; e.g.
``python -c 'import json,sys; from lenslab_workspace.train.status import is_alive;
print(is_alive(json.load(open(sys.argv[1]))))' runs/<name>/status.json``). The pid alone is
not enough (pids are reused): the boot id and the pid's start time must match too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from lenslab_workspace.train.atomic import write_json_atomic

log = logging.getLogger("lenslab.train")

SCHEMA_VERSION = 1
STATES = ("starting", "running", "finished", "interrupted", "failed")
ACTIVE_STATES = ("starting", "running")
BOOT_ID_FILE = Path("/proc/sys/kernel/random/boot_id")


def boot_id() -> str | None:
    try:
        return BOOT_ID_FILE.read_text().strip() or None
    except OSError:
        return None


def pid_start_ticks(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot; None if there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ")".
    fields = text[text.rfind(")") + 2 :].split()
    with contextlib.suppress(IndexError, ValueError):
        return int(fields[19])
    return None


def is_alive(status: dict[str, Any]) -> bool | None:
    """Whether the trainer that wrote ``status`` still runs: True, False, or None (cannot tell
    from here: another host, or no /proc).

    A finished, interrupted or failed run is not alive. A "starting"/"running" one is alive only
    if this is the same host and boot and its pid is a process that started when it did.
    """
    if status.get("state") not in ACTIVE_STATES:
        return False
    if status.get("hostname") != socket.gethostname():
        return None
    here = boot_id()
    if here is None or not isinstance(status.get("pid"), int):
        return None
    if status.get("boot_id") != here:
        return False  # the machine rebooted since: every process of that boot is gone
    started = pid_start_ticks(status["pid"])
    return started is not None and started == status.get("pid_start_ticks")


class StatusFile:
    def __init__(self, path: Path, name: str, tokens_total: int, saes: list[dict[str, Any]] | None = None) -> None:
        self.path = path
        self.started_at = time.time()
        self.fields: dict[str, Any] = {
            "schema": SCHEMA_VERSION,
            "name": name,
            "state": "starting",
            "step": 0,
            "tokens_done": 0,
            "tokens_total": tokens_total,
            "tokens_per_second": None,
            "eta_seconds": None,
            "losses": {},
            "last_checkpoint": None,
            "resumed_from_step": None,
            "message": None,
            "mirror": None,
            "pid": os.getpid(),
            "hostname": socket.gethostname(),
            "boot_id": boot_id(),
            "pid_start_ticks": pid_start_ticks(os.getpid()),
            "started_at": self.started_at,
            "updated_at": self.started_at,
        }
        if saes is not None:  # a group run: one entry per SAE
            self.fields["saes"] = saes

    def update(self, **fields: Any) -> None:
        unknown = fields.keys() - self.fields.keys()
        if unknown:
            raise KeyError(f"not in the status schema: {sorted(unknown)}")
        if "state" in fields and fields["state"] not in STATES:
            raise ValueError(f"unknown state {fields['state']!r}")
        self.fields.update(fields)

    def write(self) -> None:
        """Best effort: status is for watching, so a full disk must not stop training here
        (the next checkpoint write reports it and stops cleanly)."""
        self.fields["updated_at"] = time.time()
        try:
            write_json_atomic(self.path, self.fields)
        except OSError as exc:
            log.warning("cannot write %s: %s", self.path, exc)


def plain_losses(losses: dict[str, Any]) -> dict[str, float]:
    """A train step's losses (tensors) as numbers."""
    return {key: float(value.item() if hasattr(value, "item") else value) for key, value in losses.items()}


def report(
    status: StatusFile,
    trainer: Any,
    last: Any,
    mirror: dict[str, Any] | None,
    rate: float | None,
    losses: dict[str, float],
    **extra: Any,
) -> None:
    """Write where training stands: ``trainer``'s counters (a group's first SAE's), the rate,
    ``losses`` if any, the mirror's state and ``last`` (the newest committed checkpoint)."""
    total = trainer.cfg.total_training_samples
    fields: dict[str, Any] = {
        "step": trainer.n_training_steps,
        "tokens_done": trainer.n_training_samples,
        "tokens_per_second": rate,
        "eta_seconds": (total - trainer.n_training_samples) / rate if rate else None,
        **extra,
    }
    if losses:
        fields["losses"] = losses
    if mirror is not None:
        fields["mirror"] = mirror
    if last is not None:
        fields["last_checkpoint"] = {
            "step": last.step,
            "tokens": last.n_training_samples,
            "path": str(last.path),
            "time": last.created_at,
        }
    status.update(**fields)
    status.write()
