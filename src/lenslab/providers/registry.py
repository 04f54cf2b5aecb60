"""The one registry of providers: name -> "module:Class", imported only when asked for.

Adding a provider is a package under ``lenslab/providers/`` and one line in ``PROVIDERS``.
Nothing here imports a provider at module load, so ``lenslab --help`` and reading
``lenslab.toml`` import none; ``provider_class`` imports the one that is named.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from lenslab.errors import ProviderError

if TYPE_CHECKING:
    from lenslab.providers.base import ProviderClass

PROVIDERS: dict[str, str] = {
    "local": "lenslab.providers.local:LocalProvider",
    "ssh": "lenslab.providers.ssh:SSHProvider",
    "lambda": "lenslab.providers.lambda_cloud.provider:LambdaProvider",
    "runpod": "lenslab.providers.runpod.provider:RunPodProvider",
    "vast": "lenslab.providers.vast.provider:VastProvider",
    "slurm": "lenslab.providers.slurm.provider:SlurmProvider",
}


# What `lenslab init` writes when not told: any machine the user can reach, nothing rented.
DEFAULT_PROVIDER = "ssh"


def names() -> list[str]:
    return list(PROVIDERS)


def register(name: str, target: str) -> None:
    """Add (or replace) a provider: ``target`` is "package.module:Class"."""
    if ":" not in target:
        raise ValueError(f"{target!r} is not 'module:Class'")
    PROVIDERS[name] = target


def unregister(name: str) -> None:
    PROVIDERS.pop(name, None)


def provider_class(name: str) -> ProviderClass:
    """The class registered as ``name``, imported now."""
    target = PROVIDERS.get(name)
    if target is None:
        raise ProviderError(f"provider {name!r} is not available", f"use one of: {', '.join(names())}")
    module_name, _, attribute = target.partition(":")
    cls: ProviderClass = getattr(importlib.import_module(module_name), attribute)
    return cls
