"""lenslab's image on the box: built from the project's build context, or reused unchanged.

The image carries a label with a hash of its build context and arguments. ``ensure_image``
looks for that label on the box first, so a ready box costs one API call, and only a changed
context is uploaded and built (with the engine's layer cache, so an edit to lenslab's code
reuses the torch layer).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lenslab.remote.engine import ImageBuildFailed, engine_errors

if TYPE_CHECKING:
    import docker

HASH_LABEL = "lenslab.context-hash"
# Lines of build output a failure shows: enough for a pip or apt error, short enough to read.
FAILURE_TAIL_LINES = 3


@dataclass(frozen=True)
class ImageRef:
    tag: str
    image_id: str
    context_hash: str
    built: bool  # False: an image with this context hash was already on the box


def context_files(context: Path) -> list[str]:
    """The paths ``docker build`` would send, per the context's .dockerignore."""
    from docker.utils.build import exclude_paths

    ignore = context / ".dockerignore"
    patterns: list[str] = []
    if ignore.is_file():
        patterns = [line.strip() for line in ignore.read_text().splitlines() if line.strip() and line[0] != "#"]
    return sorted(str(p) for p in exclude_paths(str(context), patterns))


def context_hash(context: Path, buildargs: dict[str, str]) -> str:
    h = hashlib.sha256()
    for key in sorted(buildargs):
        h.update(f"A {key}={buildargs[key]}\0".encode())
    for rel in context_files(context):
        path = context / rel
        if path.is_symlink():
            h.update(f"L {rel} {os.readlink(path)}\0".encode())
        elif path.is_file():
            h.update(f"F {rel} {path.stat().st_mode & 0o777}\0".encode())
            if path.suffix == ".whl":
                # A wheel's name carries its version and build; hashing its ~GB of bytes on every
                # `up` would be the slowest part of a no-op.
                h.update(str(path.stat().st_size).encode())
            else:
                h.update(path.read_bytes())
    return h.hexdigest()[:16]


def find_image(client: docker.DockerClient, tag: str) -> str | None:
    import docker.errors

    with engine_errors():
        try:
            return str(client.images.get(tag).id)
        except docker.errors.ImageNotFound:
            return None


def ensure_image(
    client: docker.DockerClient,
    context: Path,
    tag: str,
    buildargs: dict[str, str],
    on_line: Callable[[str], None] | None = None,
) -> ImageRef:
    """``tag`` on the box, built from ``context`` unless an image of the same hash is there."""
    key = context_hash(context, buildargs)
    with engine_errors():
        found = client.images.list(filters={"label": f"{HASH_LABEL}={key}"})
        if found:
            image = found[0]
            if tag not in image.tags:
                repo, _, version = tag.rpartition(":") if ":" in tag.split("/")[-1] else (tag, "", "latest")
                image.tag(repo, version)
            return ImageRef(tag, str(image.id), key, built=False)
        image_id = _build(client, context, tag, buildargs, key, on_line)
    return ImageRef(tag, image_id, key, built=True)


def _build(
    client: docker.DockerClient,
    context: Path,
    tag: str,
    buildargs: dict[str, str],
    key: str,
    on_line: Callable[[str], None] | None,
) -> str:
    lines: list[str] = []
    image_id = ""
    # Host networking: the build's apt/pip reach the network the way the box itself does.
    stream: Any = client.api.build(
        path=str(context),
        tag=tag,
        buildargs=buildargs,
        labels={HASH_LABEL: key},
        network_mode="host",
        rm=True,
        forcerm=True,
        decode=True,
    )
    for chunk in stream:
        for line in str(chunk.get("stream", "")).splitlines():
            if line.strip():
                lines.append(line.rstrip())
                if on_line:
                    on_line(line.strip())
        if "aux" in chunk and "ID" in chunk["aux"]:
            image_id = chunk["aux"]["ID"]
        if "error" in chunk:
            raise ImageBuildFailed(_failure(lines, str(chunk["error"])), "fix that step, then run `lenslab up` again")
    return image_id or str(client.images.get(tag).id)


def _failure(lines: list[str], error: str) -> str:
    steps = [i for i, line in enumerate(lines) if line.startswith("Step ")]
    step = lines[steps[-1]][:160] if steps else "the build"
    after = lines[steps[-1] + 1 :] if steps else lines
    # The builder's own bookkeeping lines say nothing about why the step failed.
    output = [line.strip() for line in after if not line.startswith((" ---> ", "Removing intermediate"))]
    tail = " | ".join(output[-FAILURE_TAIL_LINES:])
    error = " ".join(error.split())[:300]
    return f"image build failed at {step}: {error}" + (f" (last lines: {tail})" if tail else "")
