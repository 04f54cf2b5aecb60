"""Where a launch resumes from: the newest valid local checkpoint, or the mirror's when it is newer.

Local checkpoints are tried newest first (checkpoint.py verifies each); one whose state files
are refused (anything but data) is moved aside and the next older one is tried, while one of
another config stops the launch (``ConfigChangedError``: the run file changed under a run).
A mirror is asked only when it could hold more: no local checkpoint, or its ``latest`` is past
the local one (a box that moved to another provider and back finds its old volume behind).
What comes from a mirror is checked where it was downloaded, before it gets a checkpoint's
name, so nothing unchecked ever looks committed.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lenslab_workspace.train import checkpoint as ckpt
from lenslab_workspace.train.errors import CheckpointError, ConfigChangedError
from lenslab_workspace.train.mirror import Mirror

log = logging.getLogger("lenslab.train")

ReadStates = Callable[[Path], dict[str, dict[str, Any]]]


@dataclass(frozen=True)
class FoundCheckpoint:
    path: Path
    manifest: dict[str, Any]
    states: dict[str, dict[str, Any]]


class ResumePoint:
    """Finds the checkpoint a run resumes from. ``read_states`` reads a checkpoint's state files
    as data only (``CheckpointError`` if refused): one SAE's, or a group's."""

    def __init__(self, checkpoints: Path, config_hash: str, mirror: Mirror | None, read_states: ReadStates) -> None:
        self.checkpoints = checkpoints
        self.config_hash = config_hash
        self.mirror = mirror
        self.read_states = read_states

    def find(self) -> FoundCheckpoint | None:
        local: FoundCheckpoint | None = None
        for path, manifest in ckpt.valid_checkpoints(self.checkpoints):
            local = self._load(path, manifest)
            if local is not None:
                break
        if self.mirror is not None and self._mirror_is_newer(local):
            restored = self.mirror.restore_latest(self.checkpoints, self._accept_from_mirror)
            if restored is not None:
                path, (manifest, states) = restored
                return FoundCheckpoint(path, manifest, states)
        return local

    def _mirror_is_newer(self, local: FoundCheckpoint | None) -> bool:
        """Whether the mirror's newest checkpoint is past the local one. A box that moved to another
        provider and back finds its old volume's checkpoints older than what the other box
        mirrored; resuming from them would redo that work. A local checkpoint needs no mirror:
        an unreachable one then only costs a warning."""
        assert self.mirror is not None
        if local is None:
            return True
        try:
            name = self.mirror.latest_name()
        except CheckpointError as exc:
            log.warning("resuming from the local checkpoint without comparing it to the mirror's: %s", exc)
            return False
        return name is not None and int(name.split("-", 1)[1]) > int(local.manifest["step"])

    def _accept_from_mirror(self, tmp: Path, manifest: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Check a mirror's copy where it was downloaded. Raises ``CheckpointError`` to refuse it."""
        if manifest["config_hash"] != self.config_hash:
            raise CheckpointError(
                f"it belongs to another config (hash {manifest['config_hash']}, this run's is {self.config_hash})"
            )
        return manifest, self.read_states(tmp)

    def _load(self, path: Path, manifest: dict[str, Any]) -> FoundCheckpoint | None:
        """Read a checkpoint's state files as data only; a refused one is moved aside."""
        if manifest["config_hash"] != self.config_hash:
            raise ConfigChangedError(
                f"checkpoint {path} belongs to another config (hash {manifest['config_hash']}); "
                "start over with --fresh or use a new run name"
            )
        try:
            return FoundCheckpoint(path, manifest, self.read_states(path))
        except CheckpointError as exc:
            aside = path.with_name(f".refused-{path.name}-{int(time.time())}")
            os.rename(path, aside)
            log.warning("checkpoint refused: %s; moved aside as %s, falling back to an earlier one", exc, aside.name)
            return None
