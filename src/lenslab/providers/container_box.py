"""The container-box contract as a cloud provider sends it: what every RunPod pod and vast.ai
instance lenslab launches runs, and what a launch shows before it spends.

The image's side (``lenslab-box serve``: sshd as ``lab`` on port 2222, the key from
``LENSLAB_PUBLIC_KEY``, the persistent root at /lab) is lenslab-workspace's.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lenslab.errors import ConfigError
from lenslab.providers.offers import Offer
from lenslab.watch.pricing import Price, price_for

if TYPE_CHECKING:
    from lenslab.config import BoxConfig

__all__ = ["Price", "price_for"]  # how [box] rents an offer, for the clouds here

# The container-box contract (the image's side is ``lenslab-box serve``).
BOX_USER = "lab"
BOX_ROOT = "/lab"
BOX_SSH_PORT = 2222
BOX_COMMAND = ("lenslab-box", "serve")
# ``[box] image = "stock"``: the provider's stock CUDA PyTorch image (``stock_image`` of each
# provider), lenslab installed at `up` into a venv on the persistent volume (remote/stockbox.py).
# No registry of lenslab's is needed. The image's own start script runs sshd as root on port 22
# with the key from PUBLIC_KEY.
STOCK_USER = "root"
STOCK_SSH_PORT = 22


def uses_stock_image(cfg: BoxConfig) -> bool:
    from lenslab.config import STOCK_IMAGE

    return cfg.image == STOCK_IMAGE


@dataclass(frozen=True)
class LaunchSpec:
    """The container every container box is: what both clouds are asked to run."""

    name: str  # lenslab-<box>: how a lost create is found again
    image: str
    command: tuple[str, ...]
    env: dict[str, str]
    port: int = BOX_SSH_PORT


@dataclass(frozen=True)
class LaunchPlan:
    """What a launch will do, shown before anything is created."""

    offer: Offer
    extras: tuple[str, ...] = ()  # e.g. "create network volume lenslab-x (50 GB) in EU-RO-1"
    where: str = ""  # the data center or location the instance goes to
    details: dict[str, Any] = field(default_factory=dict)  # the subclass's own choices
    bid: float | None = None  # $/hour for the whole instance when it is interruptible; None: on demand

    @property
    def price(self) -> float:
        """What the instance costs per hour: the bid, else the on-demand price."""
        return self.bid if self.bid is not None else (self.offer.price_on_demand or 0.0)


Confirm = Callable[[str], bool]


def prompt_on_terminal(what: str) -> bool:
    if not sys.stdin.isatty():
        return False
    return input(f"lenslab will {what}. Go ahead? [y/N] ").strip().lower() in ("y", "yes")


def warn_on_stderr(text: str) -> None:
    print(f"lenslab: warning: {text}", file=sys.stderr)


def public_key(cfg: BoxConfig) -> str:
    """The one authorized_keys line the container admits: the .pub beside the box's key."""
    from lenslab import sshconfig

    private = Path(cfg.identity_file).expanduser() if cfg.identity_file else sshconfig.ensure_keypair()
    public = Path(f"{private}.pub")
    try:
        line = public.read_text().strip()
    except OSError:
        fix = "point box.identity_file at a key with a .pub beside it"
        raise ConfigError(f"{public} cannot be read", fix) from None
    if "\n" in line or not line:
        raise ConfigError(f"{public} is not one public key line", "point box.identity_file at an OpenSSH key pair")
    return line
