"""Where a preempted box is relaunched: the cheapest matching offer on any provider with a key.

Every registered cloud whose instances are container boxes (``ContainerCloud``), that has an API
key here and takes ``[box]`` as it is (interruptible where asked), is a candidate; its live offers
are matched to ``[box]`` as `lenslab up --cheapest` matches them (gpu_types, min_vram_gb, regions,
max_price_per_hour, fallback) and priced as a launch would take them (``pricing``). The cheapest
wins; on a tie the provider the box is on stays.

Moving changes where the runs come from: a volume stays with its provider, so a box moves only
when its runs are mirrored (``[box] mirror``); the watcher keeps it on its provider otherwise.
Moving also moves the box's spending: what it spent so far goes into the new provider's ledger,
so ``budget_usd`` counts every instance on every provider (``carry_spending``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from lenslab.errors import LenslabError
from lenslab.providers import container_ledger as ledgers

if TYPE_CHECKING:
    from lenslab.config import BoxConfig
    from lenslab.providers.container_cloud import ContainerCloud
    from lenslab.providers.offers import Offer


@dataclass(frozen=True)
class Choice:
    provider: ContainerCloud
    offer: Offer
    per_hour: float  # what [box] takes it at ($/hour, the bid where interruptible)


def candidates(cfg: BoxConfig) -> list[ContainerCloud]:
    """Every cloud that could run the box now: a container cloud, with a key, taking [box]."""
    from lenslab.providers import registry
    from lenslab.providers.container_cloud import ContainerCloud

    found: list[ContainerCloud] = []
    for name in registry.names():
        try:
            cls = registry.provider_class(name)
        except (ImportError, LenslabError):
            continue  # a provider that cannot be loaded here runs nothing
        if not issubclass(cls, ContainerCloud) or (cfg.interruptible and not cls.capabilities.interruptible):
            continue
        if cls.config_problem(cfg) is None and cls.api_key():
            found.append(cls.for_cli(assume_yes=True))  # `lenslab watch` is the consent (budget_usd)
    return found


def cheapest(
    cfg: BoxConfig, providers: list[ContainerCloud], current: str, say: Callable[[str], None]
) -> Choice | None:
    """The cheapest offer matching [box] across ``providers``; None when none has one. A provider
    that does not answer is left out this time (said), never waited for."""
    from lenslab.cli.offers import box_query, matches_box
    from lenslab.watch.pricing import price_for

    choices: list[Choice] = []
    for provider in providers:
        try:
            offers = provider.offers(box_query(cfg))
        except LenslabError as exc:
            say(f"{provider.name} offers not listed ({exc}); left out of this relaunch")
            continue
        for offer in offers:
            price = price_for(cfg, offer)
            if price is not None and matches_box(offer, cfg):
                choices.append(Choice(provider, offer, price.per_hour))
    return min(choices, key=lambda c: (c.per_hour, c.provider.name != current), default=None)


def settle_spending(box_name: str, current: str) -> None:
    """Spending still in another provider's ledger, with no instance there, joins ``current``'s.

    A move records the new home first and carries the spending second (``Watcher._move``); a
    watcher killed between the two finds the box on its new provider, and this (run whenever a
    watcher starts) carries what was left behind, so the budget never forgets it."""
    from lenslab.providers import registry

    for name in registry.names():
        if name != current:
            left = ledgers.read(name, box_name)
            if left.spent_usd > 0 and not left.instance_id:
                carry_spending(box_name, name, current)


def carry_spending(box_name: str, old: str, new: str) -> None:
    """Move what the box spent on ``old`` into ``new``'s ledger, so one ledger holds it all.

    ``old``'s instance is gone by now (terminated, or vanished); one still in its ledger is
    closed first (its hours counted). The new ledger is written before the old one is emptied:
    a watcher killed between the two counts the spending twice, never zero times."""
    before = ledgers.read(old, box_name)
    if before.instance_id:
        from lenslab.watch import events

        events.record(box_name, "ended", provider=old, instance=before.instance_id, cost_usd=before.cost_now())
        before = before.closed()
    target = ledgers.read(new, box_name)
    ledgers.write(new, box_name, replace(target, spent_usd=round(target.spent_usd + before.spent_usd, 4)))
    ledgers.write(old, box_name, ledgers.Ledger())
