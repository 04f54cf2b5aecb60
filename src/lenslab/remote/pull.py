"""Copy a run's SAE from the box to the laptop and check it arrived whole.

``final/`` (SAELens's format) is preferred; a run that has not finished gives its newest
checkpoint instead. A checkpoint is verified against its ``manifest.json`` (size and sha256 of
every file, the format lenslab-train writes); ``final/`` has no manifest, so its JSON files must
parse and its safetensors headers must be whole. Neither needs torch on the laptop.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import shutil
import struct
from pathlib import Path
from typing import TYPE_CHECKING

from lenslab.errors import LenslabError

if TYPE_CHECKING:
    from lenslab.remote.bootstrap import Runner

MANIFEST = "manifest.json"
_CHUNK = 8 << 20


class PullFailed(LenslabError):
    exit_code = 9


def pull(runner: Runner, run_dir: str, dest: Path) -> tuple[Path, str]:
    """Copy ``final/`` or the newest checkpoint of ``run_dir`` below ``dest``; (local dir, what)."""
    quoted = shlex.quote(run_dir)
    found = runner.run(
        f"cd {quoted} 2>/dev/null || exit 3; if [ -d final ]; then echo final; else "
        "for d in $(ls -1d checkpoints/step-* 2>/dev/null | sort -r); do "
        '[ -f "$d/manifest.json" ] && { echo "$d"; break; }; done; fi'
    )
    if found.exit_status == 3:
        raise PullFailed(f"no run directory {run_dir} on the box", "list runs with `lenslab runs`")
    source = found.stdout.strip()
    if not source:
        raise PullFailed(f"{run_dir} has no final SAE and no checkpoint yet", "wait for the first checkpoint")
    listing = runner.run(f"cd {quoted}/{shlex.quote(source)} && find . -type f -printf '%P\\n'", check=True)
    target = dest / source
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for rel in sorted(line for line in listing.stdout.splitlines() if line):
        local = tmp / rel
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(_get(runner, f"{run_dir}/{source}/{rel}"))
    if (tmp / MANIFEST).exists():
        verify_manifest(tmp)
    else:
        verify_final(tmp)
    # Replaced only once verified, so a failed pull never clobbers a good earlier copy.
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target, source


def _get(runner: Runner, path: str) -> bytes:
    get = getattr(runner, "get", None)
    if get is not None:
        data: bytes = get(path)
        return data
    return Path(path).read_bytes()  # the local provider: the box is this machine


def verify_manifest(path: Path) -> None:
    manifest = json.loads((path / MANIFEST).read_text())
    for name, entry in manifest["files"].items():
        file = path / name
        if not file.is_file() or file.stat().st_size != entry["bytes"]:
            raise PullFailed(f"{path.name}: {name} is missing or truncated after the copy", "run the pull again")
        h = hashlib.sha256()
        with file.open("rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
        if h.hexdigest() != entry["sha256"]:
            raise PullFailed(f"{path.name}: {name} fails its checksum after the copy", "run the pull again")


def verify_final(path: Path) -> None:
    if not (path / "cfg.json").is_file() or not list(path.glob("*.safetensors")):
        raise PullFailed(f"{path}: not a saved SAE (no cfg.json or weights)", "check the run with `lenslab runs`")
    for file in path.glob("*.json"):
        try:
            json.loads(file.read_text())
        except ValueError as exc:
            raise PullFailed(f"{file.name} is not valid JSON after the copy", "run the pull again") from exc
    for file in path.glob("*.safetensors"):
        _check_safetensors(file)


def _check_safetensors(file: Path) -> None:
    """The header names every tensor's byte range; the file must be exactly that long."""
    data = file.read_bytes()
    try:
        (size,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + size])
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError) as exc:
        raise PullFailed(f"{file.name} is not a readable safetensors file", "run the pull again") from exc
    if len(data) != 8 + size + end:
        raise PullFailed(f"{file.name} is truncated ({len(data)} bytes)", "run the pull again")
