"""``lenslab offers``: live GPU offers from every provider that has a key, in one table; and the
choice ``lenslab up --cheapest`` makes from them."""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING

from lenslab.cli.common import add_command, emit, one_line

if TYPE_CHECKING:
    from lenslab.config import BoxConfig
    from lenslab.providers.base import OfferQuery, Provider, ProviderClass
    from lenslab.providers.offers import Offer


class Answer:
    """What one provider answered: its offers, or why there are none. (A plain class: this
    module is imported for `lenslab --help`, and dataclasses costs milliseconds there.)"""

    def __init__(
        self,
        provider: str,
        status: str,  # "ok" | "no key" | "failed"
        offers: list[Offer] | None = None,
        error: str | None = None,
        seconds: float = 0.0,
    ) -> None:
        self.provider, self.status, self.offers = provider, status, offers or []
        self.error, self.seconds = error, seconds


def offers(args: argparse.Namespace) -> int:
    """List GPU offers from every provider that has an API key, cheapest per GPU-hour first.

    Providers are asked at the same time. A provider without a key is one line saying how to
    add one; a provider that fails is one line; the others still show. Exits 0 when any
    provider answered.

    Example:
      lenslab offers
      lenslab offers --gpu A100 --min-vram 40
      lenslab offers --interruptible --json | jq '.offers[0]'
    """
    from dataclasses import asdict

    from lenslab.errors import ProviderError
    from lenslab.providers.base import OfferQuery
    from lenslab.providers.offers import cheapest_first

    query = OfferQuery(gpu=args.gpu, min_vram_gb=args.min_vram, interruptible=args.interruptible)
    answers = gather(query)
    found = cheapest_first((o for a in answers for o in a.offers), interruptible=args.interruptible)
    data = {
        "offers": [{**asdict(o), "price_per_gpu_hour": _per_gpu_hour(o, args.interruptible)} for o in found],
        "providers": [
            {
                "provider": a.provider,
                "status": a.status,
                "offers": len(a.offers),
                "error": a.error,
                "seconds": round(a.seconds, 3),
            }
            for a in answers
        ],
    }
    if getattr(args, "json", False) or found:
        emit(args, data, _table(found, args.interruptible))
    if not getattr(args, "json", False):
        # Notes and failures on stderr: stdout holds only the table, for a pipe to read.
        notes = ([] if found else ["no offers match"]) + _status_lines(answers)
        if notes:
            print("\n".join(notes), file=sys.stderr)
    if not any(a.status == "ok" for a in answers):
        if not answers:
            raise ProviderError("no provider lists offers", "this lenslab has no cloud provider registered")
        return ProviderError.exit_code
    return 0


def offer_classes() -> list[ProviderClass]:
    """Every registered provider that declares live offers."""
    from lenslab.providers.registry import names, provider_class

    classes = [provider_class(name) for name in names()]
    return [cls for cls in classes if cls.capabilities.offers]


def gather(query: OfferQuery, classes: list[ProviderClass] | None = None) -> list[Answer]:
    """Every offering provider's answer, asked concurrently (one thread each): the wall time is
    the slowest provider's, not the sum."""
    from concurrent.futures import ThreadPoolExecutor

    classes = offer_classes() if classes is None else classes
    if not classes:
        return []
    with ThreadPoolExecutor(max_workers=len(classes)) as pool:
        return list(pool.map(lambda cls: ask(cls, query), classes))


def ask(cls: ProviderClass, query: OfferQuery) -> Answer:
    """One provider's answer; whatever goes wrong is one line in it, never an exception."""
    from lenslab.errors import LenslabError

    start = time.monotonic()
    try:
        if cls.capabilities.needs_api_key and not cls.api_key():
            return Answer(cls.name, "no key", error=f"no key ({cls.key_hint()})")
        found = cls.for_cli().offers(query)
    except LenslabError as exc:
        return Answer(cls.name, "failed", error=one_line(str(exc)), seconds=time.monotonic() - start)
    except Exception as exc:  # a provider's bug must not hide the others' offers
        why = one_line(f"unexpected {type(exc).__name__}: {exc}")[:200]
        return Answer(cls.name, "failed", error=why, seconds=time.monotonic() - start)
    return Answer(cls.name, "ok", found, seconds=time.monotonic() - start)


def _per_gpu_hour(offer: Offer, interruptible: bool) -> float | None:
    if not interruptible:
        return offer.price_per_gpu_hour
    price = offer.price_interruptible
    return None if price is None else price / max(offer.gpu_count, 1)


def _money(value: float | None) -> str:
    return "-" if value is None else f"${value:.2f}"


COLUMNS = ("provider", "GPU", "count", "VRAM", "region", "on-demand/h", "interrupt/h", "per GPU-h", "available",
           "storage")  # fmt: skip


def _table(found: list[Offer], interruptible: bool) -> str:
    rows = [
        (
            o.provider,
            one_line(o.gpu_name),
            str(o.gpu_count),
            f"{o.vram_gb:.0f} GB",
            one_line(o.region) or "-",
            _money(o.price_on_demand),
            _money(o.price_interruptible),
            _money(_per_gpu_hour(o, interruptible)),
            "yes" if o.available else "no",
            "persistent" if o.persistent_storage else "mirror",
        )
        for o in found
    ]
    widths = [max(len(r[i]) for r in [COLUMNS, *rows]) for i in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in [COLUMNS, *rows]
    )


def _status_lines(answers: list[Answer]) -> list[str]:
    return [f"{a.provider}: {a.error if a.status == 'no key' else 'failed: ' + str(a.error)}" for a in answers
            if a.status != "ok"]  # fmt: skip


# -- lenslab up --cheapest -------------------------------------------------------------------


def box_query(box: BoxConfig) -> OfferQuery:
    from lenslab.providers.base import OfferQuery

    return OfferQuery(min_vram_gb=box.min_vram_gb, regions=tuple(box.regions) if box.regions else None)


def matches_box(offer: Offer, box: BoxConfig) -> bool:
    """An offer `up --cheapest` may take: available, on demand, one of box.gpu_types (a part of
    the GPU's name, or the offer's exact id), within box.min_vram_gb / regions / max_price_per_hour."""
    from lenslab.watch.pricing import price_for

    # price_for: on demand, or interruptible with box.interruptible (and its fallback).
    if price_for(box, offer) is None or not box_query(box).accepts(offer):
        return False
    name = offer.gpu_name.lower()
    return any(wanted == offer.offer_id or wanted.lower() in name for wanted in box.gpu_types)


def cheapest_match(box: BoxConfig, provider: Provider) -> Offer:
    """The cheapest offer of the box's provider that matches [box]."""
    from lenslab.errors import ProviderError
    from lenslab.providers.offers import cheapest_first

    if not provider.capabilities.offers:
        raise ProviderError(
            f"provider {provider.name} has no offers to choose from", "drop --cheapest, or pick a cloud box.provider"
        )
    candidates = [o for o in provider.offers(box_query(box)) if matches_box(o, box)]
    if not candidates:
        raise ProviderError(
            f"no {provider.name} offer matches box.gpu_types {box.gpu_types}{_limits(box)} right now",
            "see `lenslab offers`, then widen box.gpu_types, min_vram_gb, regions or max_price_per_hour",
        )
    from lenslab.watch.pricing import price_for

    return min(cheapest_first(candidates), key=lambda o: getattr(price_for(box, o), "per_hour", 0.0))


def confirm_offer(provider: str, offer: Offer, assume_yes: bool, box: BoxConfig | None = None) -> None:
    """Show the offer and ask (``--yes``: show it only); a no is one line, nothing launched."""
    from lenslab.errors import ProviderError
    from lenslab.watch.pricing import price_for

    taken = price_for(box, offer) if box is not None else None
    price = taken.per_hour if taken is not None else (offer.price_on_demand or 0.0)
    bid = taken is not None and taken.interruptible
    how = f"interruptible, bidding ${price:.2f}/hour" if bid else f"${price:.2f}/hour"
    what = (
        f"launch {offer.gpu_count}x {one_line(offer.gpu_name)} ({offer.vram_gb:.0f} GB) on {provider}"
        f"{' in ' + one_line(offer.region) if offer.region else ''} at {how}"
    )
    if assume_yes:
        print(f"lenslab: will {what}", file=sys.stderr)
        return
    if not _agreed(f"lenslab will {what}. Go ahead? [y/N] "):
        raise ProviderError(f"not launched: lenslab would {what}", "re-run with --yes to accept")


def _limits(box: BoxConfig) -> str:
    parts = []
    if box.min_vram_gb is not None:
        parts.append(f"min_vram_gb {box.min_vram_gb:g}")
    if box.regions:
        parts.append(f"regions {box.regions}")
    if box.max_price_per_hour is not None:
        parts.append(f"max_price_per_hour {box.max_price_per_hour:g}")
    return f" ({', '.join(parts)})" if parts else ""


def _agreed(question: str) -> bool:
    return sys.stdin.isatty() and input(question).strip().lower() in ("y", "yes")


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = add_command(commands, "offers", offers)
    parser.add_argument("--gpu", metavar="NAME", help="only GPUs whose name contains NAME (e.g. A100, 4090)")
    parser.add_argument("--min-vram", metavar="GB", type=_positive, help="only GPUs with at least GB of memory")
    parser.add_argument("--interruptible", action="store_true", help="only offers with an interruptible price")


def _positive(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of GB") from None
    if not number > 0 or number == float("inf"):
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive number of GB")
    return number
