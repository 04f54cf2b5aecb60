"""``status.json``: what the run is doing, for people and for the laptop side.

Schema (version 1), every key always present:

    {
      "schema": 1,
      "name": str,                   run name
      "state": "starting" | "running" | "finished" | "interrupted" | "failed",
      "step": int,                   training steps done
      "tokens_done": int,            activations (tokens) trained on
      "tokens_total": int,           training_tokens of the run
      "tokens_per_second": float | null,   over this launch
      "eta_seconds": float | null,
      "losses": {str: float},        the latest step's losses (SAELens names)
      "last_checkpoint": {"step": int, "tokens": int, "path": str, "time": float} | null,
      "resumed_from_step": int | null,
      "message": str | null,         why it failed or was interrupted
      "pid": int, "hostname": str,
      "started_at": float, "updated_at": float    unix seconds
    }

It is replaced atomically (write aside, fsync, rename), so a reader never sees half a file.
"""

from __future__ import annotations

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


class StatusFile:
    def __init__(self, path: Path, name: str, tokens_total: int) -> None:
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
            "pid": os.getpid(),
            "hostname": socket.gethostname(),
            "started_at": self.started_at,
            "updated_at": self.started_at,
        }

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
