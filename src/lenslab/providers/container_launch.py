"""One launch on a container cloud: reuse lenslab's live instance or create one, then wait for it.

The rules (see ``container_cloud``): consent before anything is created, a budget that cannot pay
one hour refuses first, one instance per box named ``lenslab-<box>`` (a create whose reply was
lost is looked for by that name before it is sent again), and a boot deadline after which the
instance is terminated. ``Launch`` holds one API client and one ``[box]`` for the length of a
launch; what differs between clouds comes from the provider's hooks (``_plan``, ``_create``).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import TYPE_CHECKING

from lenslab.errors import BootFailed, LenslabError, ProviderError
from lenslab.providers import container_ledger as ledgers
from lenslab.providers.base import OfferQuery, add_note
from lenslab.providers.container_box import LaunchPlan, LaunchSpec, price_for
from lenslab.providers.offers import (
    RUNNING,
    STARTING,
    TERMINATED,
    CloudNoCapacity,
    CloudOutcomeUnknown,
    Instance,
    Offer,
)
from lenslab.watch import events

if TYPE_CHECKING:
    from lenslab.config import BoxConfig
    from lenslab.providers.container_cloud import CloudApi, ContainerCloud

POLL_SECONDS = 3.0
WAIT_POLL_SECONDS = 30.0  # fallback = "wait": how often offers are looked at again
# After a create with no usable reply: how often to look for the instance by name before
# deciding the create did not happen, and how often to create at most.
LOOKUP_ATTEMPTS = 3
LOOKUP_INTERVAL_SECONDS = 2.0
CREATE_ATTEMPTS = 3


class BudgetReached(ProviderError):
    """box.budget_usd cannot pay one more hour: nothing was launched."""


class Launch:
    def __init__(self, provider: ContainerCloud, api: CloudApi, cfg: BoxConfig) -> None:
        self.provider, self.api, self.cfg = provider, api, cfg

    def run(self, offer: Offer | None) -> Instance:
        """The live instance, or a new one from ``offer`` (or the first matching offer)."""
        self.provider.seen = self.provider._named(self.api, self.cfg.alias)
        live = self.reuse()
        if live is not None:
            return live
        chosen = offer if offer is not None else self.first_offer()
        instance = self.launch_new(chosen)
        self.provider.seen = [instance]
        return instance

    def first_offer(self) -> Offer:
        """The cheapest offer of the first of box.gpu_types that [box] takes at some price;
        with ``fallback = "wait"`` looked for again until one appears (resume_wait_minutes)."""
        cfg, provider = self.cfg, self.provider
        deadline = provider.clock() + cfg.resume_wait_minutes * 60
        while True:
            query = OfferQuery(min_vram_gb=cfg.min_vram_gb, interruptible=cfg.interruptible)
            found = [o for o in self.api.live_offers(query) if price_for(cfg, o) is not None]
            for wanted in cfg.gpu_types:
                matching = [o for o in found if wanted == o.offer_id or wanted.lower() in o.gpu_name.lower()]
                if matching:
                    return min(matching, key=lambda o: hourly(cfg, o))
            if not (cfg.interruptible and cfg.fallback == "wait") or provider.clock() >= deadline:
                break
            provider.warn(
                f"no interruptible {provider.name} offer within box.max_price_per_hour; waiting (fallback = wait)"
            )
            provider.sleep(WAIT_POLL_SECONDS)
        kind = "interruptible offer" if cfg.interruptible and cfg.fallback == "wait" else "offer"
        raise CloudNoCapacity(
            f"no {provider.name} {kind} of box.gpu_types {cfg.gpu_types} is available right now",
            "see `lenslab offers`, then widen box.gpu_types, min_vram_gb or max_price_per_hour",
            code="lenslab/no-offer",
        )

    def reuse(self) -> Instance | None:
        """lenslab's running (or starting) instance, waited for; the others named for the box
        (stopped, preempted, a second one) are terminated: they bill for nothing."""
        provider, cfg = self.provider, self.cfg
        usable = [i for i in provider.seen if i.state in (RUNNING, STARTING)]
        best = min(usable, key=lambda i: (i.state != RUNNING, not i.ssh_host), default=None)
        for other in provider.seen:
            if other is not best:
                provider.warn(
                    f"terminating instance {other.name} ({other.id}, {other.state}): lenslab uses one instance"
                )
                self.api.remove(other.id)
        provider.seen = [] if best is None else [best]
        if best is None:
            return None
        ledger = ledgers.read(provider.name, cfg.name)
        if ledger.instance_id != best.id:
            # Found, not launched from here: its price is known; its start is the API's where it
            # has one, else now (counting it as free would blind budget_usd), and that is said.
            launched_at = best.created_at
            if launched_at is None:
                launched_at = time.time()
                provider.warn(
                    f"instance {best.name} ({best.id}) was not launched from here and {provider.name} gives no "
                    "start time: its cost counts from now"
                )
            ledger = ledgers.Ledger(
                instance_id=best.id, price_per_hour=best.price_per_hour or 0.0, gpu=best.gpu_name,
                launched_at=launched_at, spent_usd=ledger.spent_usd,
            )  # fmt: skip
            ledgers.write(provider.name, cfg.name, ledger)
        if best.state == RUNNING and best.ssh_host and best.ssh_port:
            return best
        return self.wait(best.id, best.name)

    def launch_new(self, offer: Offer) -> Instance:
        provider, cfg = self.provider, self.cfg
        previous = ledgers.read(provider.name, cfg.name).instance_id
        if previous:
            # No live instance is left (``reuse``): the previous one was taken back by the
            # provider or terminated as a leftover. Its hours stay counted against budget_usd.
            provider._closed(cfg.name, previous)
        price = price_for(cfg, offer)
        if price is None:
            kind = "interruptible " if cfg.interruptible and cfg.fallback == "wait" else ""
            raise ProviderError(
                f"offer {offer.gpu_name} on {provider.name} has no {kind}price within box.max_price_per_hour",
                "pick another offer (`lenslab offers`), or raise box.max_price_per_hour",
            )
        self.check_budget(price.per_hour)
        plan = replace(provider._plan(self.api, cfg, offer), bid=price.per_hour if price.interruptible else None)
        what = provider.describe(plan)
        if not provider.confirm(what):
            raise ProviderError(f"not launched: lenslab would {what}", "re-run with --yes to accept")
        spec = provider._spec(cfg, price.per_hour)
        instance_id = self.create_once(plan, spec)
        spent = ledgers.read(provider.name, cfg.name).spent_usd
        ledger = ledgers.Ledger(
            instance_id, price.per_hour, offer.gpu_name, plan.where, time.time(), spent,
            interruptible=price.interruptible, on_demand_price=price.on_demand,
        )  # fmt: skip
        ledgers.write(provider.name, cfg.name, ledger)
        events.record(
            cfg.name, "launched", provider=provider.name, instance=instance_id, gpu=offer.gpu_name,
            region=plan.where, price=price.per_hour, on_demand=price.on_demand, interruptible=price.interruptible,
        )  # fmt: skip
        return self.wait(instance_id, cfg.alias)

    def check_budget(self, price: float) -> None:
        """Refuse, before asking, a launch that box.budget_usd cannot pay one hour of."""
        cfg = self.cfg
        if cfg.budget_usd is None:
            return
        left = cfg.budget_usd - ledgers.read(self.provider.name, cfg.name).spent_usd
        if left < price:
            raise BudgetReached(
                f"box.budget_usd ${cfg.budget_usd:.2f} has ${max(left, 0):.2f} left, less than one hour at "
                f"${price:.2f}/hour; nothing was launched",
                "raise box.budget_usd in lenslab.toml, or choose a cheaper offer (`lenslab offers`)",
            )

    def create_once(self, plan: LaunchPlan, spec: LaunchSpec) -> str:
        """Create and return the id; a create whose reply was lost is looked for by name first
        and sent again only when no instance of that name appeared."""
        for attempt in range(1, CREATE_ATTEMPTS + 1):
            try:
                return self.provider._create(self.api, self.cfg, plan, spec)
            except CloudOutcomeUnknown as exc:
                found = self.look_for(spec.name)
                if found is not None:
                    return found.id
                if attempt == CREATE_ATTEMPTS:
                    add_note(exc, f"no instance named {spec.name} appeared, so none is billing")
                    raise
        raise AssertionError("unreachable: the last attempt returns or raises")

    def look_for(self, name: str) -> Instance | None:
        for attempt in range(LOOKUP_ATTEMPTS):
            if attempt:
                self.provider.sleep(LOOKUP_INTERVAL_SECONDS)  # an accepted create may take a moment to list
            found = self.provider._named(self.api, name)
            if found:
                return found[0]
        return None

    def wait(self, instance_id: str, name: str) -> Instance:
        """Until the instance runs with a public SSH port; terminated at the deadline or when it
        stops or vanishes while starting. Any other failure says what bills."""
        provider, cfg = self.provider, self.cfg
        timeout = cfg.boot_timeout_minutes * 60
        deadline = provider.clock() + timeout
        try:
            while True:
                instance = self.api.instance(instance_id)
                if instance is not None and instance.state == RUNNING and instance.ssh_host and instance.ssh_port:
                    return instance
                if instance is None and not self.gone(instance_id):
                    continue  # a listing lag right after the create: it is there after all
                if instance is None or instance.state not in (RUNNING, STARTING):
                    reason = "vanished" if instance is None else f"went {instance.provider_status}"
                elif provider.clock() >= deadline:
                    reason = f"was still starting after {timeout:.0f} s"
                else:
                    provider.sleep(min(POLL_SECONDS, max(deadline - provider.clock(), 0.05)))
                    continue
                raise self.give_up(instance_id, name, reason)
        except BootFailed:
            raise
        except BaseException as exc:
            note = provider.still_billing_named(cfg.name, name)
            if isinstance(exc, LenslabError):
                add_note(exc, note)
            else:
                provider.warn(note)
            raise

    def gone(self, instance_id: str) -> bool:
        """The instance is not listed, looked at a few times: a create may take a moment to list."""
        for attempt in range(LOOKUP_ATTEMPTS):
            if attempt:
                self.provider.sleep(LOOKUP_INTERVAL_SECONDS)
            found = self.api.instance(instance_id)
            if found is not None and found.state != TERMINATED:
                return False
        return True

    def give_up(self, instance_id: str, name: str, reason: str) -> BootFailed:
        """Terminate a failed boot. The ledger is closed, and "does not bill" said, only when the
        terminate went through or the instance is confirmed gone; else it stays for `down`."""
        failed: LenslabError | None = None
        try:
            self.api.remove(instance_id)
        except LenslabError as exc:
            failed = exc
        if failed is not None and not self.gone(instance_id):
            return BootFailed(
                f"instance {name} ({instance_id}) {reason}, and lenslab could not terminate it "
                f"({failed.message}), so it may still bill",
                "run `lenslab down` to terminate it",
            )
        self.provider._closed(self.cfg.name, instance_id)
        return BootFailed(
            f"instance {name} ({instance_id}) {reason}; lenslab terminated it so it does not bill",
            "run `lenslab up` again, or choose another offer (`lenslab offers`)",
        )


def hourly(cfg: BoxConfig, offer: Offer) -> float:
    price = price_for(cfg, offer)
    return float("inf") if price is None else price.per_hour
