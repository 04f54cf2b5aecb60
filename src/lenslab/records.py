"""Typed records passed between the CLI, the providers and the remote layer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

OutputSink = Callable[[str, str], None]
"""Receives ("stdout" | "stderr", text) as a command produces it."""


@dataclass(frozen=True)
class RunResult:
    exit_status: int
    stdout: str
    stderr: str


@dataclass(frozen=True)
class Box:
    """A box as a provider knows it: enough to reach it and to write its ssh config entry."""

    name: str  # box.name in lenslab.toml
    provider: str  # a name in lenslab.providers.registry
    alias: str  # ssh Host alias, lenslab-<name>
    root: str  # persistent root on the box; a leading ~ is the box user's home
    host: str | None = None  # None for the local provider: no SSH involved
    port: int = 22
    user: str | None = None
    identity_file: Path | None = None
    host_key_fingerprint: str | None = None  # announced by the provider; verified on first use
