"""What ``Runner.put`` reads from and ``Runner.get`` writes to, and the local box's copies.

Both stream in ``TRANSFER_CHUNK`` pieces: a checkpoint or a dataset of any size passes with
bounded memory. Files are opened here and closed when the transfer ends; streams the caller
opened stay the caller's.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

from lenslab.errors import CommandFailed, LenslabError

TRANSFER_CHUNK = 1 << 20


class Writer(Protocol):
    """Where ``get`` writes chunks: an open binary file, or anything with ``write(bytes)``."""

    def write(self, data: bytes, /) -> object: ...


Source = bytes | Path | BinaryIO
Sink = Path | Writer


@contextlib.contextmanager
def open_source(source: Source) -> Iterator[BinaryIO]:
    if isinstance(source, bytes):
        yield io.BytesIO(source)
    elif isinstance(source, Path):
        try:
            handle = source.open("rb")
        except OSError as exc:
            raise LenslabError(f"cannot read {source} ({exc.strerror})") from exc
        with handle:
            yield handle
    else:
        yield source


@contextlib.contextmanager
def open_sink(dest: Sink) -> Iterator[Writer]:
    if isinstance(dest, Path):
        try:
            handle = dest.open("wb")
        except OSError as exc:
            raise LenslabError(f"cannot write {dest} ({exc.strerror})") from exc
        with handle:
            yield handle
    else:
        yield dest


def local_put(source: Source, path: str, mode: int) -> None:
    """The local box's ``put``: the same atomic replace, on this machine's disk."""
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    except OSError as exc:
        raise CommandFailed(f"cannot write {path}: {exc.strerror}", 1) from exc
    try:
        with os.fdopen(fd, "wb") as out, open_source(source) as reader:
            shutil.copyfileobj(reader, out, TRANSFER_CHUNK)
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise CommandFailed(f"cannot write {path}: {exc.strerror}", 1) from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def local_get(path: str, dest: Sink) -> int:
    """The local box's ``get``: a chunked copy; the number of bytes."""
    try:
        # Opened apart from the copy: a failure here is the box's file, one below the laptop's disk.
        reader = Path(path).open("rb")  # noqa: SIM115 - closed by the `with` below
    except OSError as exc:
        raise CommandFailed(f"cannot read {path}: {exc.strerror}", 1) from exc
    count = 0
    with reader, open_sink(dest) as writer:
        while chunk := reader.read(TRANSFER_CHUNK):
            try:
                writer.write(chunk)
            except OSError as exc:
                raise LenslabError(f"cannot write the copy of {path} ({exc.strerror})", "free some disk space") from exc
            count += len(chunk)
    return count
