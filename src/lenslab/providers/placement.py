"""Where a box lives now, when `lenslab watch` moved it off the provider lenslab.toml names.

A watcher relaunches a preempted box on the cheapest matching offer of any provider with a key
(``watch/relocate``). When that offer is another provider's, it writes
``<state dir>/placement/<box>.json`` (``{"provider": name}``) before it launches there, and
``provider_for`` consults it: `status`, `runs`, `ssh`, `pull`, `train` and `down` then find the
box where it lives now. A move back to the provider lenslab.toml names removes the record.

A record naming a provider that is not registered, or that cannot be read, is ignored: the box
is then looked for where lenslab.toml says, as before any move; so is a record made while
lenslab.toml named another provider. `lenslab down` removes the record once the instance where
the box was moved is terminated: the next `up` (and `down --purge`, which deletes the volume
left on lenslab.toml's provider) goes where lenslab.toml says.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from lenslab import files
from lenslab.watch.events import state_dir

if TYPE_CHECKING:
    from lenslab.config import BoxConfig


def path(box_name: str) -> Path:
    return state_dir() / "placement" / f"{box_name}.json"


def moved_to(cfg: BoxConfig) -> str | None:
    """The provider the box was moved to, or None when it lives where lenslab.toml says."""
    from lenslab.providers import registry

    try:
        record = json.loads(path(cfg.name).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    name = record.get("provider")
    # A record made while lenslab.toml named another provider is stale: the user has changed
    # where the box lives since, and lenslab.toml wins.
    if record.get("configured") != cfg.provider:
        return None
    return name if isinstance(name, str) and name in registry.names() else None


def where(cfg: BoxConfig) -> str:
    """The provider the box lives on now: the one it was moved to, else lenslab.toml's."""
    return moved_to(cfg) or cfg.provider


def forget(cfg: BoxConfig) -> None:
    """The box lives where lenslab.toml says again (`lenslab down` ended it where it was moved)."""
    with contextlib.suppress(FileNotFoundError):
        path(cfg.name).unlink()


def move(cfg: BoxConfig, provider: str) -> None:
    """Record that the box now lives on ``provider`` (written whole before anything launches)."""
    target = path(cfg.name)
    if provider == cfg.provider:
        with contextlib.suppress(FileNotFoundError):
            target.unlink()
        return
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    record = {"provider": provider, "configured": cfg.provider, "since": round(time.time(), 3)}
    files.write_atomic(target, json.dumps(record, sort_keys=True), 0o600)
