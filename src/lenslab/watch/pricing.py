"""How ``[box]`` rents an offer: interruptible at the minimum bid, or on demand (its fallback).

Shared by `lenslab up` (``cli/offers``), the cloud providers' launches and the watcher's
relaunches, so all three take the same offer at the same price.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lenslab.config import BoxConfig
    from lenslab.providers.offers import Offer


@dataclass(frozen=True)
class Price:
    """How a box rents an offer: interruptible (bidding ``per_hour``) or on demand."""

    interruptible: bool
    per_hour: float  # $/hour for the whole instance
    on_demand: float | None  # the offer's on-demand $/hour, to compare costs with


def price_for(cfg: BoxConfig, offer: Offer) -> Price | None:
    """The price ``[box]`` takes ``offer`` at, or None when it takes it at none. With
    ``interruptible = true`` that is the minimum bid when within max_price_per_hour, else (with
    ``fallback = "on-demand"``) the on-demand price; ``fallback = "wait"`` takes no on-demand."""
    if not offer.available:
        return None
    limit = cfg.max_price_per_hour

    def within(price: float | None) -> bool:
        return price is not None and (limit is None or price <= limit)

    if cfg.interruptible and within(offer.price_interruptible):
        assert offer.price_interruptible is not None
        return Price(True, offer.price_interruptible, offer.price_on_demand)
    if cfg.interruptible and cfg.fallback == "wait":
        return None
    if within(offer.price_on_demand):
        assert offer.price_on_demand is not None
        return Price(False, offer.price_on_demand, offer.price_on_demand)
    return None
