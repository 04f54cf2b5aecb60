"""The lambda provider: a Lambda Cloud GPU instance with a persistent file system.

``launch`` reuses lenslab's usable instance (named ``lenslab-<box>``), or plans one (GPU type
by preference, region by capacity and by where the file system lives), shows its price, and
launches it only after the user agreed (``--yes`` or the prompt). The launch record (instance
id, launch time, price, budget) is written as soon as the launch returns an id. ``terminate``
gives back every instance with the box's name that is not terminated, whatever its state
(Lambda has no stop), and keeps the file system. The API key comes from ``LAMBDA_API_KEY`` or a
chmod 600 file; it is never written to the box or printed. Each operation opens its own API
client and closes it when done.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from lenslab import config, files
from lenslab.config import BoxConfig
from lenslab.errors import BootFailed, ConfigError, LenslabError, ProviderError, UnexpectedReply
from lenslab.providers.base import AutostopInputs, Capabilities, OfferQuery, Provider, add_note
from lenslab.providers.lambda_cloud.api import API_BASE, Instance, LambdaClient
from lenslab.providers.lambda_cloud.launch import (
    USABLE_STATES,
    LaunchPlan,
    best_instance,
    execute_plan,
    gpu_count,
    lenslab_instances,
    plan_launch,
    terminate_all,
    terminate_quietly,
    wait_until_active,
)
from lenslab.providers.offers import Offer
from lenslab.records import Box
from lenslab.remote.bootstrap import Runner

API_KEY_ENV = "LAMBDA_API_KEY"
# Where the API is; only changed to reach a proxy or the test emulator.
API_URL_ENV = "LAMBDA_API_URL"
DEFAULT_USER = "ubuntu"  # the user of Lambda's images
# Where the box keeps the key when it may terminate itself (root only); the staged file's name.
BOX_KEY_NAME = "lambda-api-key"
BOX_KEY_FILE = f"/etc/lenslab/{BOX_KEY_NAME}"


def api_key_file() -> Path:
    return Path.home() / ".config" / "lenslab" / "lambda-api-key"


def record_file(box_name: str) -> Path:
    """What lenslab knows about the instance it launched (id, launch time, price, budget)."""
    return files.lenslab_dir() / f"lambda-{box_name}.json"


class LaunchRecord(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    instance_id: str
    price_cents_per_hour: int
    instance_type: str = ""
    region: str = ""
    launched_at: float | None = None  # None: found running, not launched from here
    budget_usd: float | None = None


def _short_sleep(seconds: float) -> None:
    """Listing offers is a question: retry briefly, so a provider that is down is one line soon."""
    time.sleep(min(seconds, 0.25))


def client_from_environment(sleep: Callable[[float], None] = time.sleep) -> LambdaClient:
    key = config.secret(API_KEY_ENV, api_key_file())
    if not key:
        raise ConfigError(
            f"no Lambda Cloud API key: set {API_KEY_ENV}, or write the key to {api_key_file()} (chmod 600)",
            "make a key at https://cloud.lambda.ai/api-keys",
        )
    return LambdaClient(key, base_url=os.environ.get(API_URL_ENV, API_BASE), sleep=sleep)


Confirm = Callable[[LaunchPlan], bool]


def describe(plan: LaunchPlan) -> str:
    kind = plan.offer.instance_type
    extras = []
    if plan.create_file_system:
        extras.append(f"create file system {plan.file_system} there")
    if plan.register_ssh_key:
        extras.append(f"register your lenslab SSH key as {plan.ssh_key_name}")
    more = f"; and {', '.join(extras)}" if extras else ""
    return (
        f"launch {kind.name} ({kind.description}) in {plan.offer.region} "
        f"at ${plan.offer.dollars_per_hour:.2f}/hour{more}"
    )


def prompt_on_terminal(plan: LaunchPlan) -> bool:
    if not sys.stdin.isatty():
        return False
    answer = input(f"lenslab will {describe(plan)}. Go ahead? [y/N] ")
    return answer.strip().lower() in ("y", "yes")


def warn_on_stderr(text: str) -> None:
    print(f"lenslab: warning: {text}", file=sys.stderr)


def billing_note(name: str, record: LaunchRecord) -> str:
    where = f" ({record.instance_type} in {record.region})" if record.instance_type else ""
    return (
        f"instance {name}{where} is still running at ${record.price_cents_per_hour / 100:.2f}/hour; "
        "`lenslab down` terminates it"
    )


class LambdaProvider(Provider):
    name = "lambda"
    capabilities: ClassVar[Capabilities] = Capabilities(
        rents_machines=True,
        cost=True,
        persistent_volumes=True,
        autostop="watch",
        autostop_inputs=True,
        offers=True,
        api_key_env=API_KEY_ENV,
        api_key_file="lambda-api-key",
    )
    # Replaced at launch by the file system's mount, /lambda/nfs/lenslab-<project>.
    default_root: ClassVar[str] = "~/lenslab"
    summary: ClassVar[str] = "a Lambda Cloud GPU (key: LAMBDA_API_KEY or ~/.config/lenslab/lambda-api-key)"

    @classmethod
    def for_cli(cls, *, assume_yes: bool = False) -> LambdaProvider:
        return cls(confirm=(lambda plan: True) if assume_yes else prompt_on_terminal)

    def __init__(
        self,
        confirm: Confirm = prompt_on_terminal,
        client: LambdaClient | None = None,
        warn: Callable[[str], None] = warn_on_stderr,
    ) -> None:
        self.confirm = confirm
        self.warn = warn
        self._client = client  # given (tests): used as is and left open
        self.seen: list[Instance] = []  # lenslab's instances at the last launch/get, any state

    @contextlib.contextmanager
    def _api(self) -> Iterator[LambdaClient]:
        if self._client is not None:
            yield self._client
            return
        with client_from_environment() as client:
            yield client

    def launch(self, cfg: BoxConfig) -> Box:
        with self._api() as client:
            self.seen = lenslab_instances(client, cfg.alias)
            instance = self._reuse(client, cfg, self.seen)
            if instance is None:
                instance = self._launch_new(client, cfg)
        return self._box(cfg, instance)

    def launch_offer(self, cfg: BoxConfig, offer: Offer) -> Box:
        """Launch exactly the chosen instance type in its region (or reuse the live instance)."""
        return self.launch(cfg.model_copy(update={"gpu_types": [offer.offer_id], "regions": [offer.region]}))

    def _reuse(self, client: LambdaClient, cfg: BoxConfig, present: list[Instance]) -> Instance | None:
        """The usable instance with the box's name, after terminating the others (a second
        one left by an earlier lost reply, or one that went unhealthy): they bill for nothing."""
        best = best_instance(present)
        usable = best if best is not None and best.status in USABLE_STATES else None
        for other in present:
            if other is not usable and other.status != "terminating":
                self.warn(f"terminating instance {other.name} ({other.id}, {other.status}): lenslab uses one instance")
                terminate_quietly(client, other.id)
        if usable is None:
            return None
        record = _read_record(cfg.name)
        if record is None or record.instance_id != usable.id:
            record = LaunchRecord(
                instance_id=usable.id,
                price_cents_per_hour=usable.price_cents_per_hour,
                instance_type=usable.instance_type,
                region=usable.region,
                budget_usd=cfg.budget_usd,
            )
            _write_record(cfg.name, record)
        if usable.status == "active" and usable.ip:
            return usable
        return self._wait(client, cfg, usable.id, record)

    def _launch_new(self, client: LambdaClient, cfg: BoxConfig) -> Instance:
        public_key = _public_key(cfg)
        plan = plan_launch(client, cfg.name, cfg.project or cfg.name, cfg.gpu_types, cfg.regions, public_key)
        if not self.confirm(plan):
            raise ProviderError(f"not launched: lenslab would {describe(plan)}", "re-run with --yes to accept")
        launched: list[LaunchRecord] = []

        def record(instance_id: str) -> None:
            launched.append(
                LaunchRecord(
                    instance_id=instance_id,
                    price_cents_per_hour=plan.offer.instance_type.price_cents_per_hour,
                    instance_type=plan.offer.instance_type.name,
                    region=plan.offer.region,
                    launched_at=time.time(),
                    budget_usd=cfg.budget_usd,
                )
            )
            _write_record(cfg.name, launched[0])

        timeout = cfg.boot_timeout_minutes * 60
        try:
            instance, _ = execute_plan(client, plan, public_key, boot_timeout=timeout, on_launched=record)
        except BaseException as exc:
            if launched:
                self._tell_what_bills(exc, plan.name, launched[0])
            raise
        return instance

    def _wait(self, client: LambdaClient, cfg: BoxConfig, instance_id: str, record: LaunchRecord) -> Instance:
        try:
            return wait_until_active(client, instance_id, cfg.boot_timeout_minutes * 60)
        except BaseException as exc:
            self._tell_what_bills(exc, cfg.alias, record)
            raise

    def _tell_what_bills(self, exc: BaseException, name: str, record: LaunchRecord) -> None:
        """After a launch, any failure (Ctrl-C included) says the instance bills and how to stop
        it; not after ``BootFailed``, whose instance lenslab terminated."""
        if isinstance(exc, BootFailed):
            return
        if isinstance(exc, LenslabError):
            add_note(exc, billing_note(name, record))
        else:
            self.warn(billing_note(name, record))

    def get(self, cfg: BoxConfig) -> Box | None:
        """lenslab's instance in any state but terminated; its Box has no host while it has no IP."""
        with self._api() as client:
            self.seen = lenslab_instances(client, cfg.alias)
        instance = best_instance(self.seen)
        return None if instance is None else self._box(cfg, instance)

    def connect(self, box: Box, *, attempts: int | None = None) -> Runner:
        from lenslab.providers.ssh import target
        from lenslab.remote.ssh import CONNECT_ATTEMPTS, SSHLink

        if not box.host:
            raise ProviderError(
                f"instance {box.alias} has no IP address yet", "run `lenslab up`, which waits until it is ready"
            )
        return SSHLink.connect(target(box), attempts=CONNECT_ATTEMPTS if attempts is None else attempts)

    def terminate(self, box: Box) -> None:
        from lenslab.remote.hostkeys import forget, host_entry

        with self._api() as client:
            terminate_all(client, box.alias)
        # The next instance at this address is a new machine with new host keys.
        if box.host:
            forget(files.known_hosts_path(), host_entry(box.host, box.port))
        record_file(box.name).unlink(missing_ok=True)

    def still_billing(self, box: Box) -> str | None:
        """What to tell the user when something fails after the instance was launched."""
        record = _read_record(box.name)
        return None if record is None else billing_note(box.alias, record)

    def autostop_inputs(self, cfg: BoxConfig) -> AutostopInputs:
        """What the box's watcher needs: the instance and its price (for the budget), and, when
        the box is to terminate itself, the API's URL and the key."""
        record = _read_record(cfg.name)
        if record is None:
            return AutostopInputs()
        settings: dict[str, Any] = {
            "lambda_instance_id": record.instance_id,
            "price_cents_per_hour": record.price_cents_per_hour,
        }
        if record.launched_at is not None:
            settings.update(launched_at=record.launched_at, budget_usd=cfg.budget_usd)
        if cfg.autostop != "box":
            return AutostopInputs(settings)
        settings.update(
            action="lambda-terminate",
            lambda_api_url=os.environ.get(API_URL_ENV, API_BASE),
            lambda_key_file=BOX_KEY_FILE,
        )
        return AutostopInputs(settings, config.secret(API_KEY_ENV, api_key_file()), BOX_KEY_NAME)

    def instances_seen(self) -> list[dict[str, Any]]:
        return [
            {"id": i.id, "status": i.status, "instance_type": i.instance_type, "region": i.region,
             "price_per_hour_usd": i.price_cents_per_hour / 100}
            for i in self.seen
        ]  # fmt: skip

    def kept_note(self) -> str:
        return " (the file system stays, billed by Lambda per GB-month; `lenslab down --purge` deletes it)"

    def purge(self, cfg: BoxConfig, ask: Callable[[str], bool], assume_yes: bool) -> str | None:
        """Delete the file system lenslab-<project> (all its data) after an explicit yes."""
        from lenslab.errors import ObjectDoesNotExist

        name = f"lenslab-{cfg.project or cfg.name}"
        with self._api() as client:
            fs = next((f for f in client.file_systems() if f.name == name), None)
            if fs is None:
                return None
            if not assume_yes and not ask(f"delete file system {name} in {fs.region} and ALL data on it? [y/N] "):
                raise ProviderError(f"file system {name} was not deleted", "re-run with --purge --yes to delete it")
            # Not there: deleted by an attempt whose reply was lost, which is what was asked for.
            with contextlib.suppress(ObjectDoesNotExist):
                client.delete_file_system(fs.id)
        return f"file system {name}"

    def offers(self, query: OfferQuery) -> list[Offer]:
        """One offer per instance type and region with capacity (one unavailable row for a type
        with none), from GET /instance-types. Lambda has no interruptible instances."""
        if self._client is not None:
            types = self._client.instance_types()
        else:
            with client_from_environment(sleep=_short_sleep) as client:
                types = client.instance_types()
        found = []
        for kind in types.values():
            regions = kind.regions_with_capacity or ("",)
            for region in regions:
                found.append(
                    Offer(
                        provider=self.name,
                        offer_id=kind.name,
                        gpu_name=kind.gpu_description or kind.name,
                        gpu_count=gpu_count(kind),
                        vram_gb=_vram_gb(kind.gpu_description),
                        region=region,
                        price_on_demand=kind.price_cents_per_hour / 100,
                        price_interruptible=None,
                        available=bool(region),
                        persistent_storage=True,  # a file system in the region outlives instances
                    )
                )
        return [o for o in found if query.accepts(o)]

    def cost(self, box_name: str) -> dict[str, Any] | None:
        """Price, hours and cost so far of the instance lenslab launched for this box."""
        record = _read_record(box_name)
        if record is None:
            return None
        price = record.price_cents_per_hour / 100
        hours = None if record.launched_at is None else (time.time() - record.launched_at) / 3600
        return {
            "price_per_hour_usd": price,
            "billed_hours": None if hours is None else round(hours, 3),
            "cost_usd": None if hours is None else round(price * hours, 2),
            "instance_type": record.instance_type,
            "region": record.region,
        }

    @staticmethod
    def _box(cfg: BoxConfig, instance: Instance) -> Box:
        file_system = f"lenslab-{cfg.project or cfg.name}"
        mount = f"/lambda/nfs/{file_system}" if file_system in instance.file_system_names else cfg.persistent_root
        return Box(
            name=cfg.name,
            provider=LambdaProvider.name,
            alias=cfg.alias,
            root=cfg.root or mount,
            host=_checked_ip(instance),
            port=cfg.port,
            user=cfg.user or DEFAULT_USER,
            identity_file=Path(cfg.identity_file).expanduser() if cfg.identity_file else files.default_key_path(),
        )


def _vram_gb(description: str) -> float:
    """One GPU's memory from Lambda's description, e.g. "A100 (40 GB SXM4)"; 0 when not said."""
    found = re.search(r"(\d+(?:\.\d+)?)\s*GB", description)
    return float(found.group(1)) if found else 0.0


def _checked_ip(instance: Instance) -> str | None:
    """The instance's IP, which goes into the ssh config: an IP address and nothing else."""
    if not instance.ip:
        return None
    try:
        return str(ipaddress.ip_address(instance.ip))
    except ValueError:
        raise UnexpectedReply(
            f"Lambda Cloud API GET /instances: instance {instance.id} has an ip that is not an IP address",
            "Lambda Cloud may be having trouble; try again later",
            code="lenslab/unexpected-reply",
        ) from None


def _public_key(cfg: BoxConfig) -> str:
    from lenslab import sshconfig

    private = Path(cfg.identity_file).expanduser() if cfg.identity_file else sshconfig.ensure_keypair()
    public = Path(f"{private}.pub")
    if not public.exists():
        raise ConfigError(f"{public} does not exist", "point box.identity_file at a key with a .pub beside it")
    return public.read_text().strip()


def _write_record(box_name: str, record: LaunchRecord) -> None:
    files.ensure_dirs()
    files.write_atomic(record_file(box_name), record.model_dump_json(), 0o600)


def _read_record(box_name: str) -> LaunchRecord | None:
    """The record, or None when there is none or it is unreadable (then lenslab knows less
    about cost, but still finds and terminates the instance by its name)."""
    try:
        return LaunchRecord.model_validate(json.loads(record_file(box_name).read_text()))
    except (OSError, ValueError, ValidationError):
        return None
