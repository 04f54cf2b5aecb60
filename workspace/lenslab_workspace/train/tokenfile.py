"""The token array, written by a background thread while training already reads it.

Training needs only its first rows to start, so the dataset is tokenized in a thread into
``data/.tokens-<key>.npy.partial`` (a ``.npy`` file whose header is rewritten with the final
shape at the end) and readers wait only for the rows they ask for. Every second or so the
thread records in ``.tokens-<key>.progress.json`` how many rows are in the file and where in
the dataset they end (rows read, plus the tokens of a not yet whole sequence); a relaunch
truncates the file to that many rows and continues from there. The complete array is renamed
to ``tokens-<key>.npy``: the rows and their order are those of a tokenization in one go.

The record is checked before it is believed (its digest, the file's last row, every count and
token id in range), because a wrong one would silently make wrong rows: one that fails any
check is discarded, with a warning, and the dataset is tokenized again from the start.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import stat
import struct
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from lenslab_workspace.train.atomic import fsync_dir, write_json_atomic
from lenslab_workspace.train.dataset import Boundary, ByteTokenizer, resumable_sequences
from lenslab_workspace.train.errors import DataError
from lenslab_workspace.train.prefetch import Prefetcher

log = logging.getLogger("lenslab.train")

HEADER_BYTES = 128  # fixed, so the final shape can be written over the first one in place
DTYPE = np.dtype("<i4")
FLUSH_ROWS = 1024  # rows handed to readers at a time (or FLUSH_SECONDS, whichever first)
FLUSH_SECONDS = 0.1
COMMIT_SECONDS = 1.0  # how often the progress record is made durable
PROGRESS_VERSION = 2  # 2: with a digest and the last row's CRC (a version 1 record is discarded)
RECORD_KEYS = frozenset({"version", "columns", "rows", "dataset_rows", "carry", "kept", "last_row", "digest"})
RECORD_LIMIT = 1 << 20  # bytes; a sound record is a few kB (carry < context_size ids)
TOKEN_LIMIT = 1 << 31  # ids are stored as int32


def record_digest(fields: dict[str, Any]) -> str:
    """SHA-256 of a progress record's fields (all but ``digest``) as canonical JSON: a record
    edited or damaged after it was written no longer matches."""
    body = {key: value for key, value in fields.items() if key != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 0  # not bool, not float: JSON 1.0 or true is no count


class TokenRows(Protocol):
    """Rows of token ids that may still be arriving."""

    def available(self, needed: int, timeout: float | None = None) -> int | None:
        """Rows there are once ``needed`` exist or the array is complete (then its length);
        ``None`` if ``timeout`` seconds pass first."""

    def read(self, start: int, count: int) -> np.ndarray:
        """Rows ``start .. start + count`` (all present: ask ``available`` first)."""


class ArrayRows:
    """A complete array (memory-mapped or in memory) as ``TokenRows``."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def available(self, needed: int, timeout: float | None = None) -> int | None:
        return int(self.array.shape[0])

    def read(self, start: int, count: int) -> np.ndarray:
        return np.asarray(self.array[start : start + count])


def npy_header(rows: int, columns: int) -> bytes:
    """A version 1.0 ``.npy`` header of exactly ``HEADER_BYTES`` bytes (np.load reads it)."""
    text = "{'descr': '<i4', 'fortran_order': False, 'shape': (" + f"{rows}, {columns}" + "), }"
    body = text.ljust(HEADER_BYTES - 10 - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(body)) + body.encode("latin1")


class TokenFile:
    """``TokenRows`` of an array being tokenized by a background thread into ``target``.

    ``needed`` positions (those ``positions`` selects of each row, less ``exclude`` tokens)
    end the array, as the end of the dataset does.
    """

    def __init__(
        self,
        runner: dict[str, Any],
        model: Any,
        tokenizer: Any,
        target: Path,
        needed: int,
        exclude: torch.Tensor | None,
    ) -> None:
        self.runner, self.model, self.tokenizer = runner, model, tokenizer
        self.target, self.needed, self.exclude = target, needed, exclude
        self.columns = int(runner.get("context_size", 128))
        self.positions = slice(*runner.get("seqpos_slice", (None,)))
        self.partial = target.with_name(f".{target.name}.partial")
        self.progress = target.with_name(f".{target.stem}.progress.json")
        self._cond = threading.Condition()
        self._written = 0
        self._complete = False
        self._error: BaseException | None = None
        self._fd = self._open_partial()
        # Rows an earlier launch kept are readable at once, before the thread starts.
        self._written, self._start, self._kept_before = self._resume_point()
        self._thread: Prefetcher[None] = Prefetcher(self._produce, depth=1, name="lenslab-tokenize")

    # -- readers ------------------------------------------------------------------------

    def available(self, needed: int, timeout: float | None = None) -> int | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self._error is not None:
                    raise self._error
                if self._complete or self._written >= needed:
                    return self._written
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._cond.wait(left)

    def read(self, start: int, count: int) -> np.ndarray:
        size = count * self.columns * DTYPE.itemsize
        data = os.pread(self._fd, size, HEADER_BYTES + start * self.columns * DTYPE.itemsize)
        return np.frombuffer(data, dtype=DTYPE).reshape(count, self.columns)

    def wait_complete(self) -> np.ndarray:
        """The whole array, memory-mapped, once the thread has finished it."""
        with self._cond:
            while not self._complete and self._error is None:
                self._cond.wait()
        if self._error is not None:
            raise self._error
        return np.load(self.target, mmap_mode="r")  # type: ignore[no-any-return]

    # -- the writer thread ------------------------------------------------------------------

    def _open_partial(self) -> int:
        """The partial file, locked; another process writing the same one makes this launch
        write a private copy instead (both end as the same bytes under the same name)."""
        self.target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.partial, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            self.partial = self.partial.with_name(f"{self.partial.name}-{os.getpid()}")
            self.progress = self.progress.with_name(f"{self.progress.name}-{os.getpid()}")
            fd = os.open(self.partial, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        return fd

    def _resume_point(self) -> tuple[int, Boundary | None, int]:
        """Rows kept from an earlier launch, where the dataset stands after them, positions kept."""
        record = self._read_record()
        if record is None:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, npy_header(0, self.columns), 0)
            return 0, None, 0
        rows, dataset_rows, carry = record["rows"], record["dataset_rows"], record["carry"]
        os.ftruncate(self._fd, HEADER_BYTES + rows * self._row_bytes)
        log.info("continuing to tokenize the dataset after %d sequences (%d rows read)", rows, dataset_rows)
        tail = None if carry is None else torch.tensor(carry, dtype=torch.long)
        return rows, Boundary(dataset_rows, tail), record["kept"]

    @property
    def _row_bytes(self) -> int:
        return self.columns * DTYPE.itemsize

    def _read_record(self) -> dict[str, Any] | None:
        """The progress record if it is sound; else ``None``, and it is removed (with a warning
        if there was one): the dataset is then tokenized from the start."""
        problem: str | None = None
        try:
            text = self._read_progress_file()
        except FileNotFoundError:
            return None
        except OSError as exc:
            problem = f"cannot be read ({exc.strerror or exc})"
        else:
            try:
                record = json.loads(text)
            except (ValueError, RecursionError):  # RecursionError: absurdly nested JSON
                problem = "is not JSON"
            else:
                problem = "is too large" if len(text) > RECORD_LIMIT else self._record_problem(record)
        if problem is None:
            return dict(record)
        log.warning("tokenizing the dataset from the start: the progress record %s %s", self.progress.name, problem)
        with contextlib.suppress(OSError):
            self.progress.unlink()
        return None

    def _read_progress_file(self) -> bytes:
        """Up to ``RECORD_LIMIT + 1`` bytes of the record; never waits (a FIFO in its place)."""
        fd = os.open(self.progress, os.O_RDONLY | os.O_NONBLOCK)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(0, "not a regular file")
            return os.read(fd, RECORD_LIMIT + 1)
        finally:
            os.close(fd)

    def _record_problem(self, record: Any) -> str | None:
        """Why ``record`` cannot be believed, or ``None`` if it passes every check."""
        if not isinstance(record, dict) or set(record) != RECORD_KEYS:
            return "does not have the expected fields (another version?)"
        if record["digest"] != record_digest(record):
            return "does not match its digest (edited or damaged)"
        if (
            record["version"] != PROGRESS_VERSION
            or type(record["columns"]) is not int
            or record["columns"] != self.columns
        ):
            return f"is of another version or context_size (not {PROGRESS_VERSION}, {self.columns})"
        rows, dataset_rows, kept = record["rows"], record["dataset_rows"], record["kept"]
        if not (_is_count(rows) and _is_count(dataset_rows) and _is_count(kept)):
            return "has a count that is not a whole number >= 0"
        if rows > 0 and dataset_rows == 0:
            return f"counts {rows} sequences from no dataset rows"
        per_row = len(range(self.columns)[self.positions])
        if kept > rows * per_row or (self.exclude is None and kept != rows * per_row):
            return f"counts {kept} kept positions for {rows} sequences of {per_row}"
        if os.fstat(self._fd).st_size < HEADER_BYTES + rows * self._row_bytes:
            return f"counts {rows} sequences, more than {self.partial.name} holds"
        if record["last_row"] != self._last_row_crc(rows):
            return f"does not match the last of the {rows} sequences in {self.partial.name}"
        return self._carry_problem(record["carry"])

    def _carry_problem(self, carry: Any) -> str | None:
        """Why ``carry`` cannot be the start of a sequence being concatenated, or ``None``."""
        if carry is None:
            return None
        if self.runner.get("disable_concat_sequences", False):
            return "carries tokens, but sequences are not concatenated"
        if not isinstance(carry, list) or not 0 < len(carry) < self.columns:
            return f"carries no list of 1 to {self.columns - 1} tokens"
        vocab = self._vocab_size() or TOKEN_LIMIT
        if not all(type(t) is int and 0 <= t < vocab for t in carry):
            return f"carries values that are not token ids (0 .. {vocab - 1})"
        bos = getattr(self.tokenizer, "bos_token_id", None) if self.runner.get("prepend_bos", True) else None
        if isinstance(bos, int) and carry[0] != bos:
            return f"carries a partial sequence that does not begin with BOS ({bos})"
        return None

    def _vocab_size(self) -> int | None:
        """The number of token ids, if the tokenizer or the model says."""
        if isinstance(self.tokenizer, ByteTokenizer):
            return self.tokenizer.bos_token_id + 1
        with contextlib.suppress(TypeError):
            return len(self.tokenizer)
        size = getattr(getattr(self.model, "cfg", None), "d_vocab", None)
        return size if isinstance(size, int) and size > 0 else None

    def _last_row_crc(self, rows: int) -> int | None:
        """CRC-32 of the file's row ``rows - 1`` (``None`` for no rows)."""
        if rows == 0:
            return None
        return zlib.crc32(os.pread(self._fd, self._row_bytes, HEADER_BYTES + (rows - 1) * self._row_bytes))

    def _produce(self, stop: threading.Event) -> None:
        try:
            self._tokenize(stop)
        except BaseException as exc:
            if isinstance(exc, DataError):  # bad data: nothing half-made stays behind
                for path in (self.progress, self.partial):
                    with contextlib.suppress(OSError):
                        path.unlink()
            with self._cond:
                self._error = exc
                self._cond.notify_all()
        return None

    def _tokenize(self, stop: threading.Event) -> None:
        start, kept = self._start, self._kept_before
        pending: list[np.ndarray] = []
        last_flush = last_commit = time.monotonic()
        for item in resumable_sequences(self.runner, self.model, self.tokenizer, start):
            now = time.monotonic()
            if isinstance(item, Boundary):
                if stop.is_set() or now - last_commit >= COMMIT_SECONDS:
                    self._flush(pending)
                    self._commit(item, kept)
                    last_commit = now
                    if stop.is_set():
                        return
                continue
            pending.append(item.to(torch.int32).numpy())
            kept += self._kept(item)
            if kept >= self.needed:
                break
            if len(pending) >= FLUSH_ROWS or now - last_flush >= FLUSH_SECONDS:
                self._flush(pending)
                last_flush = now
        self._flush(pending)
        self._finish()

    def _kept(self, sequence: torch.Tensor) -> int:
        used = sequence[self.positions]
        if self.exclude is None:
            return int(used.numel())
        return int((~torch.isin(used, self.exclude.cpu())).sum())

    def _flush(self, pending: list[np.ndarray]) -> None:
        if not pending:
            return
        data = np.stack(pending).astype(DTYPE, copy=False)
        offset = HEADER_BYTES + self._written * self.columns * DTYPE.itemsize
        os.pwrite(self._fd, data.tobytes(), offset)
        pending.clear()
        with self._cond:
            self._written += data.shape[0]
            self._cond.notify_all()

    def _commit(self, boundary: Boundary, kept: int) -> None:
        os.fsync(self._fd)  # the rows first: the record never counts rows a crash could lose
        carry = None if boundary.carry is None else [int(t) for t in boundary.carry.tolist()]
        record: dict[str, Any] = {"version": PROGRESS_VERSION, "columns": self.columns, "rows": self._written}
        record.update(dataset_rows=boundary.rows, carry=carry, kept=kept, last_row=self._last_row_crc(self._written))
        write_json_atomic(self.progress, {**record, "digest": record_digest(record)})

    def _finish(self) -> None:
        if self._written == 0:
            raise DataError(
                f"dataset_path {self.runner['dataset_path']}: empty: it yields no complete sequence of "
                f"{self.columns} tokens (no rows, or too little text in all); add data or lower context_size"
            )
        os.pwrite(self._fd, npy_header(self._written, self.columns), 0)
        os.fsync(self._fd)
        os.replace(self.partial, self.target)
        fsync_dir(self.target.parent)
        with contextlib.suppress(OSError):
            self.progress.unlink()
        log.info("tokenized %d sequences of %d tokens into %s", self._written, self.columns, self.target.name)
        with self._cond:
            self._complete = True
            self._cond.notify_all()
