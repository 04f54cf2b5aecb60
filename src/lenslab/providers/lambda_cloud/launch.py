"""Getting a ready Lambda Cloud instance: pick an offer, launch, wait, never bill silently.

``ensure_instance`` is safe to re-run: a live instance with the box's name is reused. A
launch that does not reach ``active`` before its deadline, or turns ``unhealthy``, is
terminated before the error is raised, so nothing keeps billing after lenslab gave up.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from lenslab.errors import ProviderError
from lenslab.providers.lambda_cloud.api import (
    FileSystem,
    Instance,
    InstanceType,
    InsufficientCapacity,
    LambdaClient,
    ObjectDoesNotExist,
)

LIVE_STATES = ("booting", "active")
POLL_SECONDS = 5.0
DEFAULT_BOOT_TIMEOUT_SECONDS = 900.0


@dataclass(frozen=True)
class Offer:
    instance_type: InstanceType
    region: str

    @property
    def dollars_per_hour(self) -> float:
        return self.instance_type.price_cents_per_hour / 100


@dataclass(frozen=True)
class LaunchPlan:
    """What ``lenslab up`` will do, shown to the user before any money is spent."""

    name: str  # instance name, lenslab-<box>
    offer: Offer
    file_system: str  # lenslab-<project>
    create_file_system: bool
    ssh_key_name: str
    register_ssh_key: bool


def gpu_count(kind: InstanceType) -> int:
    match = re.match(r"gpu_(\d+)x_", kind.name)
    return int(match.group(1)) if match else int(kind.specs.get("gpus", 1))


def matches(kind: InstanceType, wanted: str) -> bool:
    """``A100`` matches any A100 type; an exact type name (``gpu_1x_a100_sxm4``) matches itself."""
    if wanted == kind.name:
        return True
    token = wanted.lower()
    return not token.startswith("gpu_") and (token in kind.name.lower() or token in kind.gpu_description.lower())


def choose_offer(
    types: dict[str, InstanceType], preferences: list[str], regions: list[str] | None, home_region: str | None
) -> Offer:
    """The first preferred GPU with capacity in an allowed region; fewest GPUs, then cheapest.

    With a file system already in ``home_region``, only that region is considered: the
    persistent data lives there and a file system cannot move between regions.
    """
    for wanted in preferences:
        candidates = sorted(
            (k for k in types.values() if matches(k, wanted)), key=lambda k: (gpu_count(k), k.price_cents_per_hour)
        )
        for kind in candidates:
            available = [r for r in kind.regions_with_capacity if regions is None or r in regions]
            if home_region is not None:
                available = [r for r in available if r == home_region]
            if available:
                return Offer(kind, available[0])
    where = f"region {home_region} (where your file system is)" if home_region else "your allowed regions"
    elsewhere = sorted({r for k in types.values() for r in k.regions_with_capacity if k.regions_with_capacity})
    raise InsufficientCapacity(
        f"Lambda Cloud has no capacity for {', '.join(preferences)} in {where} right now "
        f"(capacity exists in: {', '.join(elsewhere) or 'no region'})",
        "add GPU types to box.gpu_types, allow more regions in box.regions, or try again in a few minutes",
        code="instance-operations/launch/insufficient-capacity",
    )


def find_instance(client: LambdaClient, name: str) -> Instance | None:
    return next((i for i in client.instances() if i.name == name and i.status in LIVE_STATES), None)


def plan_launch(
    client: LambdaClient,
    box_name: str,
    project: str,
    preferences: list[str],
    regions: list[str] | None,
    public_key: str,
) -> LaunchPlan:
    file_system_name = f"lenslab-{project}"
    existing = next((fs for fs in client.file_systems() if fs.name == file_system_name), None)
    offer = choose_offer(client.instance_types(), preferences, regions, existing.region if existing else None)
    key = next((k for k in client.ssh_keys() if k.public_key.split()[:2] == public_key.split()[:2]), None)
    return LaunchPlan(
        name=f"lenslab-{box_name}",
        offer=offer,
        file_system=file_system_name,
        create_file_system=existing is None,
        ssh_key_name=key.name if key else f"lenslab-{box_name}",
        register_ssh_key=key is None,
    )


def execute_plan(
    client: LambdaClient,
    plan: LaunchPlan,
    public_key: str,
    boot_timeout: float = DEFAULT_BOOT_TIMEOUT_SECONDS,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[Instance, FileSystem]:
    if plan.register_ssh_key:
        client.add_ssh_key(plan.ssh_key_name, public_key)
    file_system = next((fs for fs in client.file_systems() if fs.name == plan.file_system), None)
    if file_system is None:
        file_system = client.create_file_system(plan.file_system, plan.offer.region)
    instance_id = client.launch(
        plan.offer.region, plan.offer.instance_type.name, plan.ssh_key_name, [plan.file_system], plan.name
    )
    return wait_until_active(client, instance_id, boot_timeout, sleep, clock), file_system


def wait_until_active(
    client: LambdaClient,
    instance_id: str,
    timeout: float,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> Instance:
    deadline = clock() + timeout
    while True:
        instance = client.instance(instance_id)
        if instance.status == "active" and instance.ip:
            return instance
        if instance.status not in LIVE_STATES:
            reason = f"went {instance.status}"
        elif clock() >= deadline:
            reason = f"was still {instance.status} after {timeout:.0f} s"
        else:
            sleep(POLL_SECONDS)
            continue
        terminate_quietly(client, instance_id)
        raise ProviderError(
            f"instance {instance.name or instance_id} {reason}; lenslab terminated it so it does not bill",
            "run `lenslab up` again (another instance is launched), or choose another GPU type or region",
        )


def terminate_quietly(client: LambdaClient, instance_id: str) -> None:
    """Terminate; an instance that is already gone is what we wanted."""
    with contextlib.suppress(ObjectDoesNotExist):
        client.terminate([instance_id])
