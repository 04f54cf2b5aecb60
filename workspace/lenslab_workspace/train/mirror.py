"""Copies of committed checkpoints at any fsspec URL (``file://``, ``s3://``, ``gs://``, ...).

Layout under ``<mirror>/<run name>/``: ``checkpoints/step-N/<files>`` and ``latest``, a text
file naming the newest complete checkpoint. ``latest`` moves only after every file of the new
checkpoint is confirmed present with the right size (Composer's rule), so a crash mid-upload
leaves the previous pointer valid. A new box with an empty run directory restores from it.

Nothing read from a mirror is believed: ``latest`` must be a checkpoint name, the manifest's
file names must be plain names, and exactly the files the manifest lists are fetched into a
temporary directory inside the run, verified, checked by the run there (its config hash, and
its state files read by ``state.load_states`` as data only, never code), and only then renamed
into place; a refused copy is deleted, so nothing unchecked ever looks committed.

Uploads run on their own thread (``MirrorUploader``): an unreachable mirror does not stop
training. A failed upload is logged as a mirror error and retried with backoff, always with
the newest committed checkpoint; the run fails only after
``resilience.mirror_max_consecutive_failures`` failures in a row.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from lenslab.contract import MANIFEST_FILE, is_checkpoint_name
from lenslab_workspace.train.checkpoint import CommittedCheckpoint, apply_retention, check_manifest, crash_point, verify
from lenslab_workspace.train.errors import CheckpointError
from lenslab_workspace.train.rundir import TMP_PREFIX

log = logging.getLogger("lenslab.train")

T = TypeVar("T")

LATEST = "latest"
# Bounds on what is read from a mirror before it is checked.
MAX_POINTER_BYTES = 64
MAX_MANIFEST_BYTES = 1 << 20
MAX_RETRY_SECONDS = 60.0


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__


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

    def unreachable(self, what: str, exc: BaseException) -> CheckpointError:
        return CheckpointError(
            f"mirror {self.url}: {what} ({_one_line(exc)}); fix the mirror (or remove resilience.mirror) "
            "and run the same command again"
        )

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
            (name for name in (Path(p).name for p in self.fs.ls(base, detail=False)) if is_checkpoint_name(name)),
            key=lambda name: int(name.split("-")[1]),
            reverse=True,
        )
        for name in names[self.keep_last :]:
            if name != newest:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm(f"{base}/{name}", recursive=True)

    def latest_name(self) -> str | None:
        """The checkpoint ``latest`` names, or None (no pointer, or one that is refused)."""
        try:
            raw = self.fs.cat_file(f"{self.root}/{LATEST}", start=0, end=MAX_POINTER_BYTES + 1)
        except FileNotFoundError:
            return None
        except Exception as exc:  # unreachable: starting from scratch could hide a newer run there
            raise self.unreachable(f"cannot read {self.root}/{LATEST}", exc) from exc
        name = bytes(raw).decode("utf-8", "replace").strip()
        if len(raw) > MAX_POINTER_BYTES or not is_checkpoint_name(name):
            log.warning(
                "mirror %s: %s/%s names %r, not a checkpoint (step-<digits>); ignoring the mirror's copy",
                self.url,
                self.root,
                LATEST,
                name[:80],
            )
            return None
        return name

    def restore_latest(
        self, checkpoints_dir: Path, accept: Callable[[Path, dict[str, Any]], T]
    ) -> tuple[Path, T] | None:
        """Download the checkpoint ``latest`` names into ``checkpoints_dir``; checked before use.

        ``accept(tmp, manifest)`` checks the downloaded copy in its temporary directory (config
        hash, state files read as data only) and returns what it loaded, or raises
        ``CheckpointError``; only an accepted copy is renamed to a committed-looking name.
        Returns None (with a warning) when the mirror has no usable checkpoint.
        """
        name = self.latest_name()
        if name is None:
            return None
        tmp = checkpoints_dir / f"{TMP_PREFIX}restore-{name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            self._download(name, tmp)
            loaded = accept(tmp, verify(tmp))
        except (CheckpointError, FileNotFoundError, ValueError) as exc:  # what it serves is wrong
            shutil.rmtree(tmp, ignore_errors=True)
            log.warning("mirror %s: checkpoint %s refused: %s", self.url, name, _one_line(exc))
            return None
        except Exception as exc:  # the mirror went away mid-download
            shutil.rmtree(tmp, ignore_errors=True)
            raise self.unreachable(f"cannot download checkpoint {name}", exc) from exc
        target = checkpoints_dir / name
        if target.exists():  # a local copy that failed verification
            shutil.rmtree(target)
        os.rename(tmp, target)
        log.info("restored checkpoint %s from mirror %s", name, self.url)
        return target, loaded

    def _download(self, name: str, tmp: Path) -> None:
        """Fetch the manifest, check it, then fetch exactly the files it names."""
        remote = self._checkpoint_dir(name)
        raw = self.fs.cat_file(f"{remote}/{MANIFEST_FILE}", start=0, end=MAX_MANIFEST_BYTES + 1)
        if len(raw) > MAX_MANIFEST_BYTES:
            raise CheckpointError(f"{name}: manifest larger than {MAX_MANIFEST_BYTES} bytes")
        manifest = check_manifest(name, json.loads(bytes(raw).decode("utf-8")))
        (tmp / MANIFEST_FILE).write_bytes(raw)
        for file_name in manifest["files"]:
            self.fs.get_file(f"{remote}/{file_name}", str(tmp / file_name))


class MirrorUploader:
    """Uploads committed checkpoints on a background thread, retrying failures with backoff.

    Only the newest committed checkpoint matters: a checkpoint committed while an older one
    waits for a retry replaces it. ``retain`` (for the checkpoint writer) keeps the checkpoint
    being uploaded from local retention.
    """

    def __init__(self, mirror: Mirror, max_failures: int, retry_seconds: float) -> None:
        self.mirror = mirror
        self.max_failures = max_failures
        self.retry_seconds = retry_seconds
        self.consecutive_failures = 0
        self.errors_total = 0
        self.last_error: str | None = None
        self.last_uploaded: str | None = None
        self.fatal: str | None = None
        self._cond = threading.Condition()
        self._pending: CommittedCheckpoint | None = None
        self._current: Path | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="mirror-upload", daemon=True)
        self._thread.start()

    def submit(self, committed: CommittedCheckpoint) -> None:
        with self._cond:
            self._pending = committed
            self._cond.notify_all()

    def retain(self, checkpoints_dir: Path, keep_last: int) -> Callable[[Path], None]:
        def apply(newest: Path) -> None:
            with self._cond:
                keep = frozenset(p for p in (self._current,) if p is not None)
                apply_retention(checkpoints_dir, keep_last, newest, keep)

        return apply

    def status(self) -> dict[str, Any]:
        return {
            "url": self.mirror.url,
            "last_uploaded": self.last_uploaded,
            "consecutive_failures": self.consecutive_failures,
            "errors_total": self.errors_total,
            "last_error": self.last_error,
        }

    def close(self) -> None:
        """Give the newest checkpoint one last immediate try, then stop the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join()

    def _next(self) -> CommittedCheckpoint | None:
        with self._cond:
            while self._pending is None and not self._stopping:
                self._cond.wait()
            item, self._pending = self._pending, None
            self._current = item.path if item is not None else None
            return item

    def _run(self) -> None:
        while (item := self._next()) is not None:
            try:
                self.mirror.upload(item)
            except Exception as exc:  # fsspec backends raise their own types for one cause: unreachable
                if not self._failed(item, exc):
                    return
            else:
                self.consecutive_failures, self.last_uploaded = 0, item.path.name
                if self.errors_total:
                    log.info("mirror %s: uploaded %s; the mirror works again", self.mirror.url, item.path.name)
            finally:
                with self._cond:
                    self._current = None

    def _failed(self, item: CommittedCheckpoint, exc: BaseException) -> bool:
        """Record a failure; wait out the backoff. False when the thread should stop."""
        with self._cond:
            superseded = self._pending is not None
            if not superseded:
                self._pending = item
        if superseded and not item.path.exists():
            return True  # removed by retention after a newer one was committed: not the mirror's fault
        self.consecutive_failures += 1
        self.errors_total += 1
        self.last_error = f"{item.path.name}: {_one_line(exc)}"
        if self.consecutive_failures >= self.max_failures:
            self.fatal = (
                f"mirror {self.mirror.url}: {self.consecutive_failures} uploads in a row failed "
                f"(last: {self.last_error}); fix the mirror or raise resilience.mirror_max_consecutive_failures, "
                "then run the same command again (local checkpoints are intact)"
            )
            log.error("%s", self.fatal)
            return False
        cap = max(MAX_RETRY_SECONDS, self.retry_seconds)
        delay = min(self.retry_seconds * 2 ** (self.consecutive_failures - 1), cap)
        with self._cond:
            if self._stopping:
                log.warning("mirror error: %s: %s; not mirrored", self.mirror.url, self.last_error)
                return False
            log.warning(
                "mirror error (%d in a row, the run fails at %d): %s: %s; retrying in %.0f s, training goes on",
                self.consecutive_failures,
                self.max_failures,
                self.mirror.url,
                self.last_error,
                delay,
            )
            deadline = time.monotonic() + delay
            while not self._stopping and (remaining := deadline - time.monotonic()) > 0:
                self._cond.wait(remaining)
        return True
