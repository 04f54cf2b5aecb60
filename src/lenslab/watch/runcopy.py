"""The laptop's copy of a run found on the box: its run file and its dataset, nothing else.

A run the watcher was not told about is restarted from what `lenslab train` uploaded for it
(``runs-config/<name>/`` on the box). Only the run file and the local dataset it names are
copied: never the mirror's credentials beside them (``lenslab train`` uploads those again from
this shell's environment at each start), never a link, and nothing larger than a run file or a
dataset can sensibly be, so a box cannot fill the laptop's disk. Copies are mode 600 in a
mode-700 directory, written whole or not at all.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from lenslab.errors import LenslabError
from lenslab.watch.state import directory

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

if TYPE_CHECKING:
    from lenslab.remote.labs import LabBackend

RUN_FILE_LIMIT = 1 << 20  # 1 MiB: a run file is a few hundred bytes
DATASET_LIMIT = 2 << 30  # 2 GiB: a local dataset `lenslab train` uploads beside its run file
_SAFE_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class Refused(LenslabError):
    """What was found on the box is not copied; the message says why."""


def copy_run_file(lab: LabBackend, box: str, name: str, say: Callable[[str], None]) -> str:
    """The local copy of run ``name``'s run file (its dataset beside it); "" when the box holds
    none, or one that is refused (said in one line)."""
    remote = f"{lab.lab.root}/runs-config/{name}"
    listed = lab.runner.run(f"cd {shlex.quote(remote)} && find . -maxdepth 1 -type f -name '*.toml' -printf '%s %f\\n'")
    found = [line.split(" ", 1) for line in listed.stdout.splitlines() if " " in line]
    if listed.exit_status != 0 or not found:
        return ""
    local = directory() / box / "runs-config" / name
    try:
        if len(found) > 1:
            raise Refused(f"the box holds {len(found)} run files for it")
        size, file_name = found[0]
        run_file = _fetch(lab, f"{remote}/{file_name}", local, file_name, size, RUN_FILE_LIMIT)
        dataset = _dataset(run_file)
        dataset_size = _remote_size(lab, f"{remote}/{dataset}") if dataset else None
        if dataset and dataset_size is not None:  # else a Hugging Face name, or a path on the box
            _fetch(lab, f"{remote}/{dataset}", local, dataset, dataset_size, DATASET_LIMIT)
        _check(run_file, name)
    except Refused as exc:
        say(f"run {name} found on the box is not restarted from there: {exc}; "
            f"restart it with `lenslab watch RUN.toml`")  # fmt: skip
        return ""
    return str(run_file)


def _fetch(lab: LabBackend, remote: str, local: Path, rel: str, size: str, limit: int) -> Path:
    """``remote`` copied to ``local/rel`` (mode 600, atomically), ``limit`` bytes at most."""
    parts = PurePosixPath(rel).parts
    if not parts or not all(_SAFE_PART.match(part) for part in parts):
        raise Refused(f"{rel!r} is not a plain relative file name")
    if not size.isdigit() or int(size) > limit:
        raise Refused(f"{rel} is {size} bytes, more than the {limit} a copy may hold")
    target = local.joinpath(*parts)
    local.mkdir(mode=0o700, parents=True, exist_ok=True)
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".lenslab-tmp")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            lab.runner.get(remote, _Capped(handle, limit, rel))
        os.replace(partial, target)
    except (LenslabError, OSError) as exc:
        with contextlib.suppress(OSError):
            partial.unlink()
        raise exc if isinstance(exc, Refused) else Refused(f"{rel} could not be copied ({exc})") from exc
    return target


class _Capped:
    """A sink that refuses more than ``limit`` bytes: the size the box said may be a lie."""

    def __init__(self, handle: object, limit: int, rel: str) -> None:
        self.handle, self.limit, self.rel, self.size = handle, limit, rel, 0

    def write(self, data: bytes, /) -> object:
        self.size += len(data)
        if self.size > self.limit:
            raise Refused(f"{self.rel} is more than the {self.limit} bytes a copy may hold")
        return self.handle.write(data)  # type: ignore[attr-defined]


def _dataset(run_file: Path) -> str | None:
    """The run file's dataset_path where it is a file beside it (not a Hugging Face name)."""
    try:
        raw = tomllib.loads(run_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise Refused(f"its run file is not a TOML text ({exc})") from exc
    dataset = raw.get("dataset_path")
    if not isinstance(dataset, str) or not dataset or dataset.startswith("/"):
        return None
    return dataset


def _remote_size(lab: LabBackend, remote: str) -> str | None:
    """The size of a plain file (not a link) on the box; None when there is none."""
    got = lab.runner.run(f"find {shlex.quote(remote)} -maxdepth 0 -type f -printf '%s' 2>/dev/null")
    return got.stdout.strip() if got.exit_status == 0 and got.stdout.strip() else None


def _check(run_file: Path, name: str) -> None:
    """The copy is a run file `lenslab train` takes, for this run."""
    from lenslab import runfile

    try:
        runfile.load(run_file, name)
    except LenslabError as exc:
        raise Refused(f"its run file does not load ({exc})") from exc
