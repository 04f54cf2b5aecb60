"""Copy a run's SAE from the box to the laptop and check it arrived whole.

``final/`` (SAELens's format) is preferred; a run that has not finished gives its newest
checkpoint instead. A checkpoint is verified against its ``manifest.json`` (size and sha256 of
every file, the format lenslab-train writes); ``final/`` has no manifest, so its JSON files must
parse and its safetensors headers must be whole. Neither needs torch on the laptop.

Nothing the box prints is believed. Its listing is read NUL-separated (a name may hold a
newline), and must have the shape lenslab-train writes: ``final`` or ``checkpoints/step-<N>``,
each a flat directory of regular files with simple names. Anything else refuses the whole pull
before the laptop is touched. Files land in a fresh ``.partial`` directory inside the
destination, are opened without following links, and replace the earlier copy only once
verified: nothing outside the destination is ever written or removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lenslab import contract
from lenslab.errors import LenslabError

if TYPE_CHECKING:
    from lenslab.remote.bootstrap import Runner

MANIFEST = contract.MANIFEST_FILE
_CHUNK = 8 << 20
_MAX_SAFETENSORS_HEADER = 100 << 20
_NO_RUN_DIR = 3
_SHOWN = 80  # characters of an odd name quoted back


class PullFailed(LenslabError):
    exit_code = 9


@dataclass
class Listing:
    """The run directory as the box lists it: each path's type ('f', 'd', 'l', ...) and size."""

    entries: dict[str, tuple[str, int]] = field(default_factory=dict)

    @classmethod
    def parse(cls, raw: bytes) -> Listing:
        listing = cls()
        for record in raw.split(b"\0"):
            if not record:
                continue
            kind, size, path = _split_record(record)
            listing.entries[path] = (kind, size)
        return listing

    def children(self, directory: str) -> dict[str, tuple[str, int]]:
        prefix = directory + "/"
        return {p[len(prefix) :]: v for p, v in self.entries.items() if p.startswith(prefix) and p != prefix}


def pull(runner: Runner, run_dir: str, dest: Path) -> tuple[Path, str]:
    """Copy ``final/`` or the newest checkpoint of ``run_dir`` below ``dest``; (local dir, what)."""
    listing = _list_run(runner, run_dir)
    source = choose_source(listing, run_dir)
    files = source_files(listing, source)

    def verify(copied: Path) -> None:
        if source == contract.FINAL_DIR:
            verify_final(copied)
        else:
            verify_manifest(copied, set(files))

    target = fetch_flat_dir(runner, f"{run_dir}/{source}", files, local_target(dest, source), verify)
    return target, source


def fetch_flat_dir(
    runner: Runner, remote_dir: str, files: dict[str, int], target: Path, verify: Callable[[Path], None]
) -> Path:
    """Copy the checked ``files`` (name -> size) of ``remote_dir`` to ``target``, whole or not at all.

    Files land in a fresh ``.partial`` sibling, ``verify`` checks them there, and only then does
    the copy replace ``target``; on any failure the partial copy and the directories this call
    made go again, so an earlier copy and everything around it stay as they were.
    """
    tmp = target.with_name(target.name + ".partial")
    _clear(tmp)
    made = [p for p in (tmp.parent, *tmp.parent.parents) if not p.exists()]
    tmp.mkdir(parents=True)
    try:
        for name, size in sorted(files.items()):
            _fetch(runner, f"{remote_dir}/{name}", tmp / name, size)
        verify(tmp)
        _replace(target, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for directory in made:  # deepest first; only while empty
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise
    return target


def _list_run(runner: Runner, run_dir: str) -> Listing:
    # -P (find's default) never follows a link, so a link is listed as one ("l") and refused.
    command = (
        f"cd -- {shlex.quote(run_dir)} 2>/dev/null || exit {_NO_RUN_DIR}; "
        f"find {contract.FINAL_DIR} {contract.CHECKPOINTS_DIR} -maxdepth 2 -printf '%y %s %p\\0' 2>/dev/null; true"
    )
    found = runner.run(command)
    if found.exit_status == _NO_RUN_DIR:
        raise PullFailed(f"no run directory {run_dir} on the box", "list runs with `lenslab runs`")
    if found.exit_status != 0:
        raise PullFailed(f"cannot list {run_dir} on the box (exit {found.exit_status})", "run the pull again")
    # RunResult.stdout is text (undecodable bytes replaced); NUL survives, and any name the
    # replacement altered is no simple name, so it is refused below like any other odd one.
    return Listing.parse(found.stdout.encode())


def _split_record(record: bytes) -> tuple[str, int, str]:
    try:
        kind, size, path = record.decode().split(" ", 2)
        return kind, int(size), path
    except ValueError as exc:
        raise PullFailed(f"the box printed an unreadable listing entry {_shown(record)}", "check the box") from exc


def choose_source(listing: Listing, run_dir: str) -> str:
    """``final`` when the run finished, else the newest checkpoint with a manifest."""
    final = listing.entries.get(contract.FINAL_DIR)
    if final is not None:
        if final[0] != "d":
            raise _odd(run_dir, contract.FINAL_DIR, "is not a plain directory")
        return contract.FINAL_DIR
    steps: dict[int, str] = {}
    for name, (kind, _) in listing.children(contract.CHECKPOINTS_DIR).items():
        top = name.split("/", 1)[0]
        if top.startswith(".") and top.strip("."):
            continue  # lenslab-train's unfinished writes (.tmp-step-N-<pid>): never pulled
        if not contract.is_checkpoint_name(top):
            raise _odd(run_dir, f"{contract.CHECKPOINTS_DIR}/{top}", "is not a checkpoint name (step-<digits>)")
        inner = name[len(top) + 1 :]
        if name != top and ("/" in inner or not contract.is_artifact_file_name(inner)):
            raise _odd(run_dir, f"{contract.CHECKPOINTS_DIR}/{name}", "is not a simple file name")
        if name == top and kind != "d":
            raise _odd(run_dir, f"{contract.CHECKPOINTS_DIR}/{top}", "is not a plain directory")
        if name == f"{top}/{MANIFEST}" and kind == "f":
            steps[int(top.removeprefix("step-"))] = top
    if not steps:
        raise PullFailed(f"{run_dir} has no final SAE and no checkpoint yet", "wait for the first checkpoint")
    return f"{contract.CHECKPOINTS_DIR}/{steps[max(steps)]}"


def source_files(listing: Listing, source: str) -> dict[str, int]:
    """The files to copy (name -> size): only regular files with simple names, nothing nested."""
    files: dict[str, int] = {}
    for name, (kind, size) in listing.children(source).items():
        if "/" in name or not contract.is_artifact_file_name(name):
            raise _odd(source, name, "is not a simple file name")
        if kind != "f":
            raise _odd(source, name, "is not a regular file (a link, directory or device)")
        files[name] = size
    if not files:
        raise PullFailed(f"{source} on the box is empty", "check the run with `lenslab runs`")
    return files


def local_target(dest: Path, source: str) -> Path:
    """Where ``source`` lands: resolved, checked to be inside ``dest``, through no links."""
    root = dest.resolve()
    if root.exists() and not root.is_dir():
        raise PullFailed(f"{dest} exists and is not a directory", "pass another --dest")
    target = root.joinpath(*source.split("/"))
    # Every path this pull may create, replace or remove must be a real directory or absent.
    touched = [*target.relative_to(root).parents][:-1]  # the directories between root and target
    paths = [root / p for p in touched] + [target.with_name(target.name + s) for s in ("", ".partial", ".old")]
    for path in paths:
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            raise PullFailed(f"{path} is a link or a file", f"lenslab writes only real directories in {root}")
    if not target.resolve().is_relative_to(root):
        raise PullFailed(f"{source} would land outside {root}", "nothing was written")
    return target


def _fetch(runner: Runner, remote: str, local: Path, size: int) -> None:
    # O_EXCL | O_NOFOLLOW in a directory this pull just made: only this file is written.
    fd = os.open(local, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as handle:
        got = runner.get(remote, _Bounded(handle, size, remote))
    if got != size:
        raise PullFailed(f"{remote}: got {got} bytes, the box listed {size}", "run the pull again")


class _Bounded:
    """Writes at most the size the listing gave, so a box cannot fill the laptop's disk."""

    def __init__(self, inner: Any, limit: int, what: str) -> None:
        self.inner, self.limit, self.what, self.count = inner, limit, what, 0

    def write(self, data: bytes, /) -> int:
        self.count += len(data)
        if self.count > self.limit:
            raise PullFailed(f"{self.what} grew past the {self.limit} bytes the box listed", "run the pull again")
        written: int = self.inner.write(data)
        return written


def _clear(path: Path) -> None:
    """Remove a leftover ``.partial`` (checked by ``local_target`` to be a real directory)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)


def _replace(target: Path, tmp: Path) -> None:
    """Swap the verified copy in; the earlier one is removed only once the new one is in place."""
    old = target.with_name(target.name + ".old")
    _clear(old)
    had_one = target.exists()
    if had_one:
        target.rename(old)
    try:
        tmp.rename(target)
    except OSError:
        if had_one:
            old.rename(target)
        raise
    _clear(old)


def verify_manifest(path: Path, pulled: set[str]) -> None:
    entries = _manifest_entries(path)
    extra = sorted(pulled - set(entries) - {MANIFEST})
    if extra:
        raise PullFailed(f"{path.name}: {extra[0]} is not in the checkpoint's manifest", "check the box")
    for name, (size, digest) in entries.items():
        file = path / name
        if not file.is_file() or file.stat().st_size != size:
            raise PullFailed(f"{path.name}: {name} is missing or truncated after the copy", "run the pull again")
        h = hashlib.sha256()
        with file.open("rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
        if h.hexdigest() != digest:
            raise PullFailed(f"{path.name}: {name} fails its checksum after the copy", "run the pull again")


def _manifest_entries(path: Path) -> dict[str, tuple[int, str]]:
    """The manifest's files (name -> (bytes, sha256)), each checked for shape."""
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
        entries = {name: (e["bytes"], e["sha256"]) for name, e in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise PullFailed(f"{path.name}: unreadable {MANIFEST} ({type(exc).__name__})", "check the box") from exc
    for name, (size, digest) in entries.items():
        ok_size = type(size) is int and size >= 0
        ok_digest = isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)
        if not (isinstance(name, str) and contract.is_artifact_file_name(name) and ok_size and ok_digest):
            raise PullFailed(f"{path.name}: {MANIFEST} lists an odd entry {_shown(name)}", "check the box")
    return entries


def verify_final(path: Path) -> None:
    if not (path / "cfg.json").is_file() or not list(path.glob("*.safetensors")):
        raise PullFailed(f"{path}: not a saved SAE (no cfg.json or weights)", "check the run with `lenslab runs`")
    for file in path.glob("*.json"):
        try:
            json.loads(file.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise PullFailed(f"{file.name} is not valid JSON after the copy", "run the pull again") from exc
    for file in path.glob("*.safetensors"):
        _check_safetensors(file)


def _check_safetensors(file: Path) -> None:
    """The header names every tensor's byte range; the file must be exactly that long.
    Only the header is read: the weights can be larger than the laptop's memory."""
    length = file.stat().st_size
    try:
        with file.open("rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            if size > min(_MAX_SAFETENSORS_HEADER, length):
                raise ValueError("header size past the end")
            header = json.loads(fh.read(size))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
        raise PullFailed(f"{file.name} is not a readable safetensors file", "run the pull again") from exc
    if length != 8 + size + end:
        raise PullFailed(f"{file.name} is truncated ({length} bytes)", "run the pull again")


def _odd(where: str, name: str, problem: str) -> PullFailed:
    return PullFailed(
        f"refusing to pull: the box lists {_shown(name)} in {where}, which {problem}",
        "nothing was written; check the run directory on the box",
    )


def _shown(value: object) -> str:
    text = ascii(value.decode(errors="replace") if isinstance(value, bytes) else value)
    return text if len(text) <= _SHOWN else text[: _SHOWN - 4] + "...'"
