"""The interface every provider implements, and how the CLI picks one.

A provider turns the ``[box]`` table into a reachable ``Box`` and back:
- ``launch``: create the box, or return the live one (safe to re-run);
- ``get``: the live box, or None when there is none;
- ``connect``: wait until the box answers and return a runner for commands on it;
- ``terminate``: give the machine back (a no-op for machines lenslab did not create; safe to re-run).
The persistent root is created by the bootstrap for ``local`` and ``ssh``; cloud providers will
add ``ensure_volume``.
"""

from __future__ import annotations

from typing import Protocol

from lenslab.config import BoxConfig
from lenslab.errors import ProviderError
from lenslab.records import Box
from lenslab.remote.bootstrap import Runner


class Provider(Protocol):
    name: str

    def launch(self, cfg: BoxConfig) -> Box: ...

    def get(self, cfg: BoxConfig) -> Box | None: ...

    def connect(self, box: Box, *, attempts: int) -> Runner: ...

    def terminate(self, box: Box) -> None: ...


def provider_for(cfg: BoxConfig, *, assume_yes: bool = False) -> Provider:
    """``assume_yes`` accepts a cloud launch's price without asking (``lenslab up --yes``)."""
    # Imported here so the CLI pays only for the provider it uses (paramiko for ssh).
    if cfg.provider == "local":
        from lenslab.providers.local import LocalProvider

        return LocalProvider()
    if cfg.provider == "ssh":
        from lenslab.providers.ssh import SSHProvider

        return SSHProvider()
    if cfg.provider == "lambda":
        from lenslab.providers.lambda_cloud.provider import LambdaProvider, prompt_on_terminal

        return LambdaProvider(confirm=(lambda plan: True) if assume_yes else prompt_on_terminal)
    raise ProviderError(f"provider {cfg.provider!r} is not available yet", 'use provider = "ssh" or "local"')
