"""What the RunPod and vast.ai providers share: clouds whose instances are containers.

Such an instance is itself a container of lenslab's image (``box.image``): no Docker engine
inside. It starts ``lenslab-box serve`` (sshd as user ``lab`` on port 2222, public-key login with
the key handed in as ``LENSLAB_PUBLIC_KEY``), its persistent root is mounted at ``/lab``, and the
provider maps port 2222 to a public port. ``launch`` returns that: user ``lab``, the public IP
and the mapped port. With ``image = "stock"`` the instance is the provider's own PyTorch image
instead (``stock_image``), started by its own script: sshd as root on port 22 for the key in
``PUBLIC_KEY``; `lenslab up` then installs lenslab into a venv on the volume (remote/stockbox.py).

Launching follows the rules that hold for every rented box:
- consent first: the offer, its $/hour and anything else created are shown, and nothing is
  created before a yes (``--yes`` gives it); a budget that cannot pay one hour refuses first;
- one instance per box, named ``lenslab-<box>``: a live one is reused; a create whose reply was
  lost is looked for by that name before it is sent again, so a lost reply never bills twice;
- a boot deadline (``boot_timeout_minutes``): an instance that is not running with a public SSH
  port by then, or that stops or vanishes while starting, is terminated before the error;
- the ledger (``container_ledger``) is written as soon as a create returns an id;
- autostop's settings go into the instance's environment at create (``_autostop_env``): it
  stops itself even if nothing reaches it over SSH afterwards.
One launch is carried out by ``container_launch.Launch``.

Each subclass opens its API client (``CloudApi``), plans a launch (``_plan``: where, and what
else must exist) and creates the instance (``_create``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shlex
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from lenslab import files
from lenslab.errors import ConfigError, LenslabError, ProviderError
from lenslab.providers import container_ledger as ledgers
from lenslab.providers.base import AutostopInputs, OfferQuery, Provider
from lenslab.providers.container_box import (
    BOX_COMMAND,
    BOX_ROOT,
    BOX_SSH_PORT,
    BOX_USER,
    STOCK_SSH_PORT,
    STOCK_USER,
    Confirm,
    LaunchPlan,
    LaunchSpec,
    prompt_on_terminal,
    public_key,
    uses_stock_image,
    warn_on_stderr,
)
from lenslab.providers.offers import (
    RUNNING,
    TERMINATED,
    Instance,
    Offer,
    RetryPolicy,
)
from lenslab.watch import events

if TYPE_CHECKING:
    from lenslab.config import BoxConfig
    from lenslab.records import Box
    from lenslab.remote.bootstrap import Runner

# Listing offers is a question, not a task: a provider that does not answer soon is reported
# as failing while the others show, rather than retried for half a minute.
OFFERS_POLICY = RetryPolicy(max_attempts=3, initial_backoff=0.25, max_backoff=1.0)


class CloudApi(Protocol):
    """The part of a provider's API client these providers use, in normalised records."""

    def close(self) -> None: ...

    def live_offers(self, query: OfferQuery) -> list[Offer]: ...

    def instances(self) -> list[Instance]: ...

    def instance(self, instance_id: str) -> Instance | None: ...

    def remove(self, instance_id: str) -> None: ...


class ContainerCloud(Provider):
    # Set by each subclass: the environment variable naming its API's base URL (tests, proxies).
    api_url_env: ClassVar[str]
    # The box's watcher: the variable the provider sets to the instance's id inside it, the
    # API's default URL and what the watcher does there when the box is idle or over budget.
    instance_id_env: ClassVar[str]
    default_api_url: ClassVar[str]
    autostop_action: ClassVar[str]
    default_root: ClassVar[str] = BOX_ROOT
    # ``image = "stock"``: the provider's own CUDA PyTorch image, whose start script runs sshd
    # as root on port 22 for the key in PUBLIC_KEY.
    stock_image: ClassVar[str]

    @classmethod
    def for_cli(cls, *, assume_yes: bool = False) -> ContainerCloud:
        return cls(confirm=(lambda what: True) if assume_yes else prompt_on_terminal)

    def __init__(
        self,
        api: CloudApi | None = None,
        *,
        confirm: Confirm = prompt_on_terminal,
        warn: Callable[[str], None] = warn_on_stderr,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._given = api  # given (tests): used as is and left open
        self.confirm, self.warn, self.sleep, self.clock = confirm, warn, sleep, clock
        self.seen: list[Instance] = []

    # -- subclass hooks ----------------------------------------------------------------------

    def _open(self, key: str, policy: RetryPolicy | None) -> CloudApi:
        raise NotImplementedError

    def _refusal(self, cfg: BoxConfig) -> ProviderError | None:
        """Why this box cannot be launched at all (before any offer is looked at), or None."""
        return None

    def _plan(self, api: CloudApi, cfg: BoxConfig, offer: Offer) -> LaunchPlan:
        return LaunchPlan(offer=offer, where=offer.region)

    def _create(self, api: CloudApi, cfg: BoxConfig, plan: LaunchPlan, spec: LaunchSpec) -> str:
        """Create the instance (and what it needs, after consent); its id. May raise
        ``CloudOutcomeUnknown`` when the reply was lost."""
        raise NotImplementedError

    # -- the API -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _api(self, policy: RetryPolicy | None = None) -> Iterator[CloudApi]:
        if self._given is not None:
            yield self._given
            return
        key = self.api_key()
        if not key:
            raise ConfigError(f"no {self.name} API key: {self.key_hint()} (chmod 600)")
        api = self._open(key, policy)
        try:
            yield api
        finally:
            api.close()

    @classmethod
    def base_url(cls, default: str) -> str:
        return os.environ.get(cls.api_url_env) or default

    def offers(self, query: OfferQuery) -> list[Offer]:
        with self._api(OFFERS_POLICY) as api:
            found = api.live_offers(query)
        return [o for o in found if query.accepts(o)]

    # -- launching -----------------------------------------------------------------------------

    def launch(self, cfg: BoxConfig) -> Box:
        """The live instance, or a new one on the first of ``box.gpu_types`` with an available
        on-demand offer (the cheapest of that type)."""
        return self._launch(cfg, None)

    def launch_offer(self, cfg: BoxConfig, offer: Offer) -> Box:
        """The live instance, or a new one from ``offer`` (``lenslab up --cheapest``)."""
        return self._launch(cfg, offer)

    def _launch(self, cfg: BoxConfig, offer: Offer | None) -> Box:
        from lenslab.providers.container_launch import Launch

        refusal = self._refusal(cfg)
        if refusal is not None:
            raise refusal
        with self._api() as api:
            return self._box(cfg, Launch(self, api, cfg).run(offer))

    def describe(self, plan: LaunchPlan) -> str:
        offer = plan.offer
        where = f" in {plan.where}" if plan.where else ""
        more = f"; and {', '.join(plan.extras)}" if plan.extras else ""
        how = f"interruptible, bidding ${plan.bid:.2f}/hour" if plan.bid is not None else f"${plan.price:.2f}/hour"
        gpus = f"{offer.gpu_count}x {offer.gpu_name} ({offer.vram_gb:.0f} GB)"
        return f"launch {gpus} on {self.name}{where} at {how}{more}"

    def _spec(self, cfg: BoxConfig, price_per_hour: float) -> LaunchSpec:
        """What the instance runs: lenslab's image with ``lenslab-box serve``, or the stock image
        with its own start command (sshd as root on port 22) and the key as PUBLIC_KEY too."""
        env = self._env(cfg, price_per_hour)
        if uses_stock_image(cfg):
            env["PUBLIC_KEY"] = env["LENSLAB_PUBLIC_KEY"]
            return LaunchSpec(name=cfg.alias, image=self.stock_image, command=(), env=env, port=STOCK_SSH_PORT)
        return LaunchSpec(name=cfg.alias, image=cfg.image, command=BOX_COMMAND, env=env)

    def _env(self, cfg: BoxConfig, price_per_hour: float | None = None) -> dict[str, str]:
        env = {"LENSLAB_PUBLIC_KEY": public_key(cfg), "LENSLAB_ROOT": BOX_ROOT, "LENSLAB_BOX": cfg.name}
        if price_per_hour is not None:
            env.update(self._autostop_env(cfg, price_per_hour))
        return env

    def _autostop_env(self, cfg: BoxConfig, price_per_hour: float) -> dict[str, str]:
        """The watcher's settings at create time (``ENV_SETTINGS``): until `up` writes them over
        SSH, an instance whose laptop went away still stops itself. The key goes only with
        ``autostop = "box"``, and only in the provider's own variable, never in the settings."""
        from lenslab.remote import autostop

        inputs: dict[str, Any] = {
            "instance_id_env": self.instance_id_env, "price_per_hour_usd": price_per_hour,
            "spent_before_usd": ledgers.read(self.name, cfg.name).spent_usd,
            "launched_at": time.time(), "budget_usd": cfg.budget_usd,
        }  # fmt: skip
        env: dict[str, str] = {}
        key_env, key = self.capabilities.api_key_env, self.api_key()
        if cfg.autostop == "box" and key_env and key:
            inputs.update(action=self.autostop_action, api_url=self.base_url(self.default_api_url), key_env=key_env)
            env[key_env] = key
        settings = autostop.settings_for(cfg, cfg.name, self.capabilities.autostop, inputs)
        if settings is None:
            return {}
        env[autostop.ENV_SETTINGS] = json.dumps(autostop.in_container(settings, BOX_ROOT), separators=(",", ":"))
        return env

    # -- the live box --------------------------------------------------------------------------

    @staticmethod
    def _named(api: CloudApi, name: str) -> list[Instance]:
        return [i for i in api.instances() if i.name == name and i.state != TERMINATED]

    def get(self, cfg: BoxConfig) -> Box | None:
        """lenslab's running (or starting) instance for the box; None when there is none."""
        with self._api() as api:
            self.seen = self._named(api, cfg.alias)
        if not self.seen:
            return None
        best = next((i for i in self.seen if i.ssh_host), self.seen[0])
        return self._box(cfg, best)

    def connect(self, box: Box, *, attempts: int | None = None) -> Runner:
        from lenslab.providers.ssh import target
        from lenslab.remote.ssh import CONNECT_ATTEMPTS, SSHLink

        if not box.host:
            raise ProviderError(f"instance {box.alias} has no SSH address yet", "try again in a minute")
        return SSHLink.connect(target(box), attempts=CONNECT_ATTEMPTS if attempts is None else attempts)

    def terminate(self, box: Box) -> None:
        """Every instance named for the box, whatever its state: each one may bill."""
        from lenslab.remote.hostkeys import forget, host_entry

        self._forget_key_on_box(box)
        with self._api() as api:
            for instance in self._named(api, box.alias):
                api.remove(instance.id)
        ledger = ledgers.read(self.name, box.name)
        if ledger.instance_id:
            self._closed(box.name, ledger.instance_id)
        # The next instance at this address and port is another container with another host key.
        if box.host:
            forget(files.known_hosts_path(), host_entry(box.host, box.port))

    def _forget_key_on_box(self, box: Box) -> None:
        """Remove the API key ``autostop = "box"`` left under the root, before the terminate: on a
        volume that outlives the instance, every later instance on it could read it. Best effort
        (the instance goes anyway); a key that could not be removed is said."""
        key_name = self.capabilities.api_key_file
        if not (self.capabilities.persistent_volumes and key_name and box.host):
            return  # a disk that goes with the instance takes the key with it
        from lenslab.remote.autostop import CONTAINER_DIR

        key_file = f"{box.root.rstrip('/')}/{CONTAINER_DIR}/{key_name}"
        try:
            runner = self.connect(box, attempts=1)
            try:
                runner.run(f"rm -f {shlex.quote(key_file)}", check=True)
            finally:
                runner.close()
        except LenslabError as exc:
            self.warn(
                f"could not remove the {self.name} API key from the volume ({exc.message}): {key_file} may still "
                "hold it; delete it from the next instance on that volume, or revoke the key"
            )

    def _closed(self, box_name: str, instance_id: str) -> None:
        """The instance is gone: its cost moves into what the box spent, and the log says so."""
        ledger = ledgers.read(self.name, box_name)
        ledgers.write(self.name, box_name, ledger.closed())
        events.record(box_name, "ended", provider=self.name, instance=instance_id, cost_usd=ledger.cost_now())

    # -- interruptible instances (`lenslab watch`) -----------------------------------------------

    def current(self, cfg: BoxConfig) -> Instance | None:
        """lenslab's instance for the box, in any state but gone: the ledger's, else one named
        for the box; None when there is none."""
        ledger = ledgers.read(self.name, cfg.name)
        with self._api() as api:
            if ledger.instance_id:
                found = api.instance(ledger.instance_id)
                if found is not None and found.state != TERMINATED:
                    return found
            named = self._named(api, cfg.alias)
        return min(named, key=lambda i: i.state != RUNNING, default=None)

    def resume(self, cfg: BoxConfig, instance: Instance) -> None:
        """Ask the provider to start a stopped or preempted instance again (``stop_resume``)."""
        raise ProviderError(f"{self.name} instances cannot be resumed", "launch a new one")

    def still_billing(self, box: Box) -> str | None:
        ledger = ledgers.read(self.name, box.name)
        return self.still_billing_named(box.name, box.alias) if ledger.instance_id else None

    def still_billing_named(self, box_name: str, name: str) -> str:
        ledger = ledgers.read(self.name, box_name)
        return (
            f"instance {name} ({ledger.gpu or ledger.instance_id}) is still running at "
            f"${ledger.price_per_hour:.2f}/hour; `lenslab down` terminates it"
        )

    def autostop_inputs(self, cfg: BoxConfig) -> AutostopInputs:
        """What the box's watcher needs: the instance, its price and what the box spent before
        (the budget), and, when the box is to stop itself, the action, the API's URL and the key
        (stored mode 600 under the persistent root's .lenslab/)."""
        ledger = ledgers.read(self.name, cfg.name)
        if not ledger.instance_id:
            return AutostopInputs()
        settings: dict[str, Any] = {
            "instance_id": ledger.instance_id, "instance_id_env": self.instance_id_env,
            "price_per_hour_usd": ledger.price_per_hour, "spent_before_usd": ledger.spent_usd,
        }  # fmt: skip
        if ledger.launched_at is not None:
            settings.update(launched_at=ledger.launched_at, budget_usd=cfg.budget_usd)
        key_name = self.capabilities.api_key_file
        if cfg.autostop != "box":
            return AutostopInputs(settings, None, key_name)  # no key on the box: the laptop stops it
        settings.update(action=self.autostop_action, api_url=self.base_url(self.default_api_url))
        return AutostopInputs(settings, self.api_key(), key_name)

    def cost(self, box_name: str) -> dict[str, Any] | None:
        """$/hour (the instance record's, else the one agreed at launch), hours since it was
        created and cost so far; ``spent_before_usd`` is the box's earlier instances."""
        ledger = ledgers.read(self.name, box_name)
        current = next((i for i in self.seen if i.id == ledger.instance_id), None)
        ours = current is not None or bool(ledger.instance_id)  # the ledger's start time applies
        if current is None and self.seen:
            current, ours = self.seen[0], False  # found running, not launched from here
        if current is None and not ledger.instance_id:
            return None
        price = current.price_per_hour if current and current.price_per_hour is not None else ledger.price_per_hour
        # Ours: the ledger's start (what budget_usd counts; RunPod's uptime restarts with the
        # container). Found: the API's start, where it reports one.
        created = ledger.launched_at if ours else None
        if created is None and current is not None:
            created = current.created_at
        hours = None if created is None else max(0.0, (time.time() - created) / 3600)
        return {
            "price_per_hour_usd": price,
            "billed_hours": None if hours is None else round(hours, 3),
            "cost_usd": None if hours is None else round(price * hours, 2),
            "spent_before_usd": round(ledger.spent_usd, 2),
            "instance_type": current.gpu_name if current else ledger.gpu,
            "region": ledger.region,
        }

    def instances_seen(self) -> list[dict[str, object]]:
        return [
            {"id": i.id, "status": i.state, "instance_type": i.gpu_name, "region": "",
             "price_per_hour_usd": i.price_per_hour or 0.0}
            for i in self.seen
        ]  # fmt: skip

    def _box(self, cfg: BoxConfig, instance: Instance) -> Box:
        from lenslab.records import Box

        host = instance.ssh_host
        if host is not None:
            try:
                host = str(ipaddress.ip_address(host))
            except ValueError:
                host = None  # written into the ssh config: an IP address and nothing else
        stock = uses_stock_image(cfg)
        return Box(
            name=cfg.name,
            provider=self.name,
            alias=cfg.alias,
            root=cfg.persistent_root,
            host=host,
            port=instance.ssh_port or (STOCK_SSH_PORT if stock else BOX_SSH_PORT),
            user=cfg.user or (STOCK_USER if stock else BOX_USER),
            identity_file=Path(cfg.identity_file).expanduser() if cfg.identity_file else files.default_key_path(),
        )
