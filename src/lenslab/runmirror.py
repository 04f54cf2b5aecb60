"""The box's mirror for the runs started on it: ``[box] mirror`` and ``[box] mirror_env``.

A run file that sets no ``[resilience] mirror`` gets the box's: ``lenslab train`` writes it
into the copy of the run file it uploads. The laptop does this, not lenslab-train reading the
instance's ``$LENSLAB_MIRROR``, because then the run file on the box says where its
checkpoints go (the same file ``lenslab-train`` reads and a user can read back), it works on
every kind of box (an SSH login, and so a run's supervisor, does not inherit a container's
environment), and a run file that names its own mirror keeps it.

The mirror's credentials are the values of the variables ``mirror_env`` names, read from the
laptop's environment and uploaded as a JSON object to a mode-600 file beside the run file; the
trainer sets them before it opens the mirror. They never appear in argv, a log or the output.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from typing import TYPE_CHECKING

from lenslab.errors import ConfigError

if TYPE_CHECKING:
    from lenslab.config import BoxConfig
    from lenslab.runfile import RunFile

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

_RESILIENCE_HEADER = re.compile(r"^\[resilience\][ \t]*(#[^\n]*)?$", re.MULTILINE)


def run_mirror(run: RunFile) -> str | None:
    """The mirror the run file names itself, if any."""
    section = tomllib.loads(run.text).get("resilience")
    mirror = section.get("mirror") if isinstance(section, dict) else None
    return mirror if isinstance(mirror, str) else None


def with_box_mirror(run: RunFile, box: BoxConfig) -> RunFile:
    """``run`` with ``[resilience] mirror`` set to the box's, unless it names one itself."""
    if not box.mirror or run_mirror(run) is not None:
        return run
    line = f"mirror = {json.dumps(box.mirror)}"  # the URL is printable ASCII: a valid TOML string
    header = _RESILIENCE_HEADER.search(run.text)
    if header is not None:
        text = f"{run.text[: header.end()]}\n{line}{run.text[header.end() :]}"
    elif "resilience" not in tomllib.loads(run.text):
        text = f"{run.text.rstrip()}\n\n[resilience]\n{line}\n"
    else:  # an inline table or dotted keys: not rewritten behind the user's back
        text = ""
    if not text or run_mirror(dataclasses.replace(run, text=text)) != box.mirror:
        raise ConfigError(
            f"{run.path}: cannot add the box's mirror to its [resilience] settings",
            f'write them as a [resilience] table, or set mirror = "{box.mirror}" there yourself',
        )
    return dataclasses.replace(run, text=text)


def mirror_env(box: BoxConfig) -> bytes | None:
    """The mode-600 file's contents: ``mirror_env``'s variables and their values here."""
    if not box.mirror_env:
        return None
    missing = [name for name in box.mirror_env if name not in os.environ]
    if missing:
        raise ConfigError(
            f"box.mirror_env names {', '.join(missing)}, which is not set in this shell",
            "export it (the box's mirror needs it), or remove it from mirror_env in lenslab.toml",
        )
    return json.dumps({name: os.environ[name] for name in box.mirror_env}).encode()
