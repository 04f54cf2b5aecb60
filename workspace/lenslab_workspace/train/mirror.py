"""Copies of committed checkpoints at any fsspec URL (``file://``, ``s3://``, ``gs://``, ...).

Layout under ``<mirror>/<run name>/``: ``checkpoints/step-N/<files>`` and ``latest``, a text
file naming the newest complete checkpoint. ``latest`` moves only after every file of the new
checkpoint is confirmed present with the right size (Composer's rule), so a crash mid-upload
leaves the previous pointer valid. A new box with an empty run directory restores from it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from lenslab_workspace.train.checkpoint import CommittedCheckpoint, crash_point, verify
from lenslab_workspace.train.errors import CheckpointError
from lenslab_workspace.train.rundir import STEP_DIR_PREFIX, TMP_PREFIX

log = logging.getLogger("lenslab.train")

LATEST = "latest"


class Mirror:
    def __init__(self, url: str, run_name: str, keep_last: int) -> None:
        import fsspec

        self.url = url
        try:
            self.fs, base = fsspec.core.url_to_fs(url)
        except (ValueError, ImportError) as exc:
            raise CheckpointError(
                f"resilience.mirror {url!r}: no filesystem for this URL ({exc}); "
                "install its fsspec backend (e.g. s3fs for s3://) or fix the URL"
            ) from exc
        self.root = f"{base.rstrip('/')}/{run_name}"
        self.keep_last = keep_last

    def _checkpoint_dir(self, name: str) -> str:
        return f"{self.root}/checkpoints/{name}"

    def upload(self, committed: CommittedCheckpoint) -> None:
        remote = self._checkpoint_dir(committed.path.name)
        self.fs.makedirs(remote, exist_ok=True)
        files = sorted(p for p in committed.path.iterdir() if p.is_file())
        for index, path in enumerate(files):
            self.fs.put_file(str(path), f"{remote}/{path.name}")
            if index == 0:
                crash_point("mirror-upload")
        for path in files:
            info = self.fs.info(f"{remote}/{path.name}")
            if int(info.get("size", -1)) != path.stat().st_size:
                raise CheckpointError(f"mirror {self.url}: {path.name} of {committed.path.name} did not arrive whole")
        self.fs.pipe_file(f"{self.root}/{LATEST}", committed.path.name.encode())
        self._apply_retention(committed.path.name)

    def _apply_retention(self, newest: str) -> None:
        base = f"{self.root}/checkpoints"
        names = sorted(
            (Path(p).name for p in self.fs.ls(base, detail=False) if Path(p).name.startswith(STEP_DIR_PREFIX)),
            reverse=True,
        )
        for name in names[self.keep_last :]:
            if name != newest:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm(f"{base}/{name}", recursive=True)

    def latest_name(self) -> str | None:
        try:
            return str(self.fs.cat_file(f"{self.root}/{LATEST}").decode().strip()) or None
        except FileNotFoundError:
            return None

    def restore_latest(self, checkpoints_dir: Path) -> Path | None:
        """Download the checkpoint ``latest`` names into ``checkpoints_dir``; verified before use."""
        name = self.latest_name()
        if name is None:
            return None
        target = checkpoints_dir / name
        tmp = checkpoints_dir / f"{TMP_PREFIX}restore-{name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        remote = self._checkpoint_dir(name)
        entries: list[Any] = self.fs.ls(remote, detail=False)
        for entry in entries:
            self.fs.get_file(entry, str(tmp / Path(entry).name))
        try:
            verify(tmp)
        except CheckpointError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        os.rename(tmp, target)
        log.info("restored checkpoint %s from mirror %s", name, self.url)
        return target
