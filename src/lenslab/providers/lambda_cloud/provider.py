"""The lambda provider: a Lambda Cloud GPU instance with a persistent file system.

``launch`` reuses the running instance named ``lenslab-<box>``, or plans one (GPU type by
preference, region by capacity and by where the file system lives), shows its price, and
launches it only after the user agreed (``--yes`` or the prompt). ``terminate`` gives the
instance back (Lambda has no stop) and keeps the file system. The API key comes from
``LAMBDA_API_KEY`` or a chmod 600 file; it is never written to the box or printed.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lenslab import config, files
from lenslab.config import BoxConfig
from lenslab.errors import ConfigError, ProviderError
from lenslab.providers.lambda_cloud.api import API_BASE, LambdaClient
from lenslab.providers.lambda_cloud.launch import (
    LaunchPlan,
    execute_plan,
    find_instance,
    plan_launch,
    terminate_quietly,
    wait_until_active,
)
from lenslab.records import Box
from lenslab.remote.bootstrap import Runner
from lenslab.remote.hostkeys import forget, host_entry
from lenslab.remote.ssh import CONNECT_ATTEMPTS, SSHLink

API_KEY_ENV = "LAMBDA_API_KEY"
# Where the API is; only changed to reach a proxy or the test emulator.
API_URL_ENV = "LAMBDA_API_URL"
DEFAULT_USER = "ubuntu"  # the user of Lambda's images


def api_key_file() -> Path:
    return Path.home() / ".config" / "lenslab" / "lambda-api-key"


def record_file(box_name: str) -> Path:
    """What lenslab knows about the instance it launched (id, launch time, price)."""
    return files.lenslab_dir() / f"lambda-{box_name}.json"


def client_from_environment() -> LambdaClient:
    key = config.secret(API_KEY_ENV, api_key_file())
    if not key:
        raise ConfigError(
            f"no Lambda Cloud API key: set {API_KEY_ENV}, or write the key to {api_key_file()} (chmod 600)",
            "make a key at https://cloud.lambda.ai/api-keys",
        )
    return LambdaClient(key, base_url=os.environ.get(API_URL_ENV, API_BASE))


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


class LambdaProvider:
    name = "lambda"

    def __init__(self, confirm: Confirm = prompt_on_terminal, client: LambdaClient | None = None) -> None:
        self.confirm = confirm
        self._client = client

    @property
    def client(self) -> LambdaClient:
        if self._client is None:
            self._client = client_from_environment()
        return self._client

    def launch(self, cfg: BoxConfig) -> Box:
        name = cfg.alias
        instance = find_instance(self.client, name)
        timeout = cfg.boot_timeout_minutes * 60
        if instance is not None and instance.status != "active":
            instance = wait_until_active(self.client, instance.id, timeout)
        if instance is None:
            public_key = _public_key(cfg)
            plan = plan_launch(self.client, cfg.name, cfg.project or cfg.name, cfg.gpu_types, cfg.regions, public_key)
            if not self.confirm(plan):
                raise ProviderError(f"not launched: lenslab would {describe(plan)}", "re-run with --yes to accept")
            instance, _ = execute_plan(self.client, plan, public_key, boot_timeout=timeout)
            _write_record(
                cfg.name,
                {
                    "instance_id": instance.id,
                    "launched_at": time.time(),
                    "price_cents_per_hour": instance.price_cents_per_hour,
                    "instance_type": instance.instance_type,
                    "region": instance.region,
                },
            )
        return self._box(cfg, instance.ip, instance.file_system_names)

    def get(self, cfg: BoxConfig) -> Box | None:
        instance = find_instance(self.client, cfg.alias)
        return None if instance is None else self._box(cfg, instance.ip, instance.file_system_names)

    def connect(self, box: Box, *, attempts: int = CONNECT_ATTEMPTS) -> Runner:
        from lenslab.providers.ssh import target

        return SSHLink.connect(target(box), attempts=attempts)

    def terminate(self, box: Box) -> None:
        instance = find_instance(self.client, box.alias)
        if instance is not None:
            terminate_quietly(self.client, instance.id)
        # The next instance at this address is a new machine with new host keys.
        if box.host:
            forget(files.known_hosts_path(), host_entry(box.host, box.port))
        record_file(box.name).unlink(missing_ok=True)

    def autostop_inputs(self, cfg: BoxConfig) -> tuple[dict[str, Any] | None, str, str | None]:
        """What the box's watcher needs: the launch record, the API's URL, and the key (only
        when the box is to terminate itself)."""
        record = _read_record(cfg.name)
        if record is None:
            instance = find_instance(self.client, cfg.alias)
            if instance is not None:  # launched elsewhere: no launch time, so no budget on the box
                record = {"instance_id": instance.id, "price_cents_per_hour": instance.price_cents_per_hour}
        key = config.secret(API_KEY_ENV, api_key_file()) if cfg.autostop == "box" else None
        return record, os.environ.get(API_URL_ENV, API_BASE), key

    def cost(self, box_name: str, uptime_s: int | None) -> dict[str, Any] | None:
        """Price, uptime and cost so far of the instance lenslab launched for this box."""
        record = _read_record(box_name)
        if record is None:
            return None
        hours = (time.time() - record["launched_at"]) / 3600
        price = record["price_cents_per_hour"] / 100
        return {
            "price_per_hour_usd": price,
            "billed_hours": round(hours, 3),
            "cost_usd": round(price * hours, 2),
            "instance_type": record["instance_type"],
            "region": record["region"],
        }

    @staticmethod
    def _box(cfg: BoxConfig, ip: str | None, file_systems: tuple[str, ...]) -> Box:
        if not ip:
            raise ProviderError(f"instance {cfg.alias} has no IP address yet", "run `lenslab up` again in a minute")
        mount = f"/lambda/nfs/{file_systems[0]}" if file_systems else cfg.persistent_root
        return Box(
            name=cfg.name,
            provider="lambda",
            alias=cfg.alias,
            root=cfg.root or mount,
            host=ip,
            port=cfg.port,
            user=cfg.user or DEFAULT_USER,
            identity_file=Path(cfg.identity_file).expanduser() if cfg.identity_file else files.default_key_path(),
        )


def _public_key(cfg: BoxConfig) -> str:
    from lenslab import sshconfig

    private = Path(cfg.identity_file).expanduser() if cfg.identity_file else sshconfig.ensure_keypair()
    public = Path(f"{private}.pub")
    if not public.exists():
        raise ConfigError(f"{public} does not exist", "point box.identity_file at a key with a .pub beside it")
    return public.read_text().strip()


def _write_record(box_name: str, record: dict[str, Any]) -> None:
    files.ensure_dirs()
    files.write_atomic(record_file(box_name), json.dumps(record), 0o600)


def _read_record(box_name: str) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(record_file(box_name).read_text())
        return data
    except (FileNotFoundError, ValueError):
        return None
