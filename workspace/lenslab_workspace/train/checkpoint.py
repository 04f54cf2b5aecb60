"""Crash-safe checkpoints: written aside, checksummed, committed by one rename.

A checkpoint directory counts only if its ``manifest.json`` exists, is written last, and
lists every file with its sha256 (TorchTitan's rule: no metadata file, no checkpoint). The
commit (Lightning's ``_atomic_save`` for directories):

1. write every file into ``checkpoints/.tmp-step-N-<pid>/`` and fsync each;
2. write ``manifest.json`` last and fsync it;
3. rename the directory to ``checkpoints/step-N`` and fsync ``checkpoints/``.

A crash before 3 leaves a ``.tmp-*`` directory that is never loaded and is removed at the
next start; a crash after 3 leaves a complete checkpoint. Old checkpoints are deleted only
after a newer one is committed (and mirrored), never before.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lenslab.contract import is_artifact_file_name, is_checkpoint_name
from lenslab_workspace.train.atomic import fsync_dir, fsync_file
from lenslab_workspace.train.errors import CheckpointError
from lenslab_workspace.train.rundir import TMP_PREFIX, step_dir_name

log = logging.getLogger("lenslab.train")

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
HASH_CHUNK_BYTES = 8 << 20
CRASH_POINT_ENV = "LENSLAB_CRASH_POINT"


def crash_point(name: str) -> None:
    """Fault injection for the kill tests: SIGKILL ourselves at a named point.

    ``LENSLAB_CRASH_POINT=<name>:<n>`` kills the process the n-th time ``name`` is reached
    (counted per process), so a test can die exactly mid-write, mid-rename or mid-mirror.
    """
    wanted = os.environ.get(CRASH_POINT_ENV)
    if not wanted or not wanted.startswith(name + ":"):
        return
    _crash_counts[name] = _crash_counts.get(name, 0) + 1
    if _crash_counts[name] == int(wanted.rsplit(":", 1)[1]):
        os.kill(os.getpid(), 9)


_crash_counts: dict[str, int] = {}


@dataclass(frozen=True)
class Snapshot:
    """Everything one checkpoint holds, already copied off the live training state.

    ``stage`` finishes copying off the live state (on the writer thread); until it returns,
    the live tensors it reads must not change, which ``CheckpointWriter.wait_staged`` lets the
    optimizer enforce. ``files`` maps each file name to a function that writes that file from
    the copies.
    """

    step: int
    n_training_samples: int
    config_hash: str
    versions: dict[str, str]
    files: dict[str, Callable[[Path], None]]
    stage: Callable[[], None] = lambda: None


@dataclass(frozen=True)
class CommittedCheckpoint:
    path: Path
    step: int
    n_training_samples: int
    created_at: float


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def commit(snapshot: Snapshot, checkpoints_dir: Path) -> CommittedCheckpoint:
    """Write ``snapshot`` as ``checkpoints_dir/step-N`` atomically (see module docstring)."""
    snapshot.stage()  # a no-op when the writer thread staged it already
    final = checkpoints_dir / step_dir_name(snapshot.step)
    tmp = checkpoints_dir / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir(parents=True)
        entries: dict[str, dict[str, Any]] = {}
        for index, (name, write) in enumerate(snapshot.files.items()):
            path = tmp / name
            write(path)
            fsync_file(path)
            entries[name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
            if index == 0:
                crash_point("checkpoint-write")
        created_at = time.time()
        manifest = {
            "format": MANIFEST_FORMAT,
            "step": snapshot.step,
            "n_training_samples": snapshot.n_training_samples,
            "config_hash": snapshot.config_hash,
            "created_at": created_at,
            "versions": snapshot.versions,
            "files": entries,
        }
        with open(tmp / MANIFEST, "w") as handle:
            json.dump(manifest, handle, indent=2, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        fsync_dir(tmp)
        crash_point("checkpoint-rename")
        if final.exists():
            # Same step committed before (a resume that re-reached it): keep the old one whole
            # until the new one is in place.
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(checkpoints_dir)
    except Exception as exc:  # writers (safetensors, torch.save) wrap OS errors in their own types
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
        if _is_disk_full(exc):
            raise CheckpointError(
                f"disk full while writing checkpoint {final.name} in {checkpoints_dir}: free space there "
                "(or lower resilience.keep_last) and run the same command again; earlier checkpoints are intact"
            ) from exc
        if isinstance(exc, OSError):
            raise CheckpointError(f"cannot write checkpoint {final.name} in {checkpoints_dir}: {exc}") from exc
        raise
    return CommittedCheckpoint(final, snapshot.step, snapshot.n_training_samples, created_at)


def _is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(exc)
    return "No space left on device" in text or "os error 28" in text


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of checkpoint directory ``path``, its shape and file names checked.

    A manifest may come from a mirror: a file name that is not a plain name (``../x``, an
    absolute path) is refused, so nothing outside the checkpoint is ever read or written.
    """
    manifest_path = path / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path.name}: no manifest (an interrupted write)") from exc
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path.name}: unreadable manifest: {' '.join(str(exc).split())}") from exc
    return check_manifest(path.name, manifest)


def check_manifest(where: str, manifest: Any) -> dict[str, Any]:
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise CheckpointError(f"{where}: manifest of an unknown format")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{where}: manifest lists no files")
    for name, entry in files.items():
        if not is_artifact_file_name(name) or name == MANIFEST:
            raise CheckpointError(f"{where}: manifest names {name[:80]!r}, not a plain file name; refused")
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("bytes"), int)
            or not isinstance(entry.get("sha256"), str)
        ):
            raise CheckpointError(f"{where}: manifest entry for {name} lacks its size or checksum")
    for key in ("step", "n_training_samples"):
        if not isinstance(manifest.get(key), int) or isinstance(manifest.get(key), bool):
            raise CheckpointError(f"{where}: manifest field {key!r} is not an integer")
    if not isinstance(manifest.get("config_hash"), str):
        raise CheckpointError(f"{where}: manifest field 'config_hash' is not a string")
    return dict(manifest)


def verify(path: Path) -> dict[str, Any]:
    """Return the manifest of a complete checkpoint, or raise ``CheckpointError`` saying why not."""
    manifest = read_manifest(path)
    for name, entry in manifest["files"].items():
        file = path / name
        if file.is_symlink() or not file.is_file():
            raise CheckpointError(f"{path.name}: {name} is missing")
        if file.stat().st_size != entry["bytes"]:
            raise CheckpointError(f"{path.name}: {name} has the wrong size (truncated?)")
        if sha256_file(file) != entry["sha256"]:
            raise CheckpointError(f"{path.name}: {name} fails its checksum")
    return manifest


def step_dirs(checkpoints_dir: Path) -> list[Path]:
    """Committed-looking checkpoint directories, newest first (not yet verified)."""
    if not checkpoints_dir.is_dir():
        return []
    found = [p for p in checkpoints_dir.iterdir() if is_checkpoint_name(p.name) and p.is_dir() and not p.is_symlink()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]), reverse=True)


def valid_checkpoints(checkpoints_dir: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Checkpoints that verify, newest first; damaged ones are skipped with a warning."""
    for path in step_dirs(checkpoints_dir):
        try:
            manifest = verify(path)
        except CheckpointError as exc:
            log.warning("skipping damaged checkpoint %s; falling back to an earlier one", exc)
            continue
        yield path, manifest


def latest_valid(checkpoints_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that verifies."""
    return next(valid_checkpoints(checkpoints_dir), None)


def remove_unfinished(checkpoints_dir: Path) -> None:
    """Delete ``.tmp-*`` leftovers of writes that a crash interrupted."""
    if checkpoints_dir.is_dir():
        for path in checkpoints_dir.iterdir():
            if path.name.startswith(TMP_PREFIX):
                shutil.rmtree(path, ignore_errors=True)


def apply_retention(checkpoints_dir: Path, keep_last: int, newest: Path, keep: frozenset[Path] = frozenset()) -> None:
    """Keep the ``keep_last`` newest checkpoints (and ``keep``: one being uploaded); called
    only after ``newest`` is committed."""
    for path in step_dirs(checkpoints_dir)[keep_last:]:
        if path != newest and path not in keep:
            shutil.rmtree(path, ignore_errors=True)


class CheckpointWriter:
    """Writes snapshots on a background thread, one at a time.

    The training loop pays only for taking the snapshot; ``submit`` waits for the previous
    write first, so at most one snapshot is in memory besides the live state. A failed
    write is raised from the next ``submit`` or ``wait``.
    """

    def __init__(
        self,
        checkpoints_dir: Path,
        keep_last: int,
        after_commit: Callable[[CommittedCheckpoint], None] | None = None,
        retain: Callable[[Path], None] | None = None,
    ) -> None:
        self._dir = checkpoints_dir
        self._keep_last = keep_last
        self._after_commit = after_commit
        self._retain = retain or (lambda newest: apply_retention(checkpoints_dir, keep_last, newest))
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._staged = threading.Event()
        self._staged.set()
        self.last_committed: CommittedCheckpoint | None = None
        self.blocked_seconds = 0.0  # time the training thread spent waiting for staging

    def submit(self, snapshot: Snapshot) -> None:
        self.wait()
        self._staged.clear()
        self._thread = threading.Thread(target=self._write, args=(snapshot,), name="checkpoint-writer")
        self._thread.start()

    def wait_staged(self) -> None:
        """Block until the current snapshot has copied the live tensors (call before mutating them)."""
        if not self._staged.is_set():
            start = time.perf_counter()
            self._staged.wait()
            self.blocked_seconds += time.perf_counter() - start

    def wait(self) -> CommittedCheckpoint | None:
        """Block until the write in flight (if any) is committed; re-raise its failure."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return self.last_committed

    def _write(self, snapshot: Snapshot) -> None:
        try:
            try:
                snapshot.stage()
            finally:
                self._staged.set()
            committed = commit(snapshot, self._dir)
            if self._after_commit is not None:
                self._after_commit(committed)
            self._retain(committed.path)
            self.last_committed = committed
        except BaseException as exc:  # re-raised on the training thread by wait()
            self._error = exc
