"""Getting a ready Lambda Cloud instance: pick an offer, launch, wait, never bill silently.

Every step is safe to re-run and safe under lost replies. lenslab names its instance
``lenslab-<box>``: an instance with that name that is not terminated is lenslab's, whatever
its state. A launch whose reply was lost is looked for by that name before launching again,
and a file system or SSH key whose creation went unanswered is looked for by its name. A
launch that does not reach ``active`` before its deadline, or turns ``unhealthy``, is
terminated before the error is raised, so nothing keeps billing after lenslab gave up.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from lenslab.errors import BootFailed, InsufficientCapacity, LambdaError, ObjectDoesNotExist, OutcomeUnknown
from lenslab.providers.lambda_cloud.api import FileSystem, Instance, InstanceType, LambdaClient

# States an instance can be used in; every state but "terminated" may still bill.
USABLE_STATES = ("booting", "active")
GONE_STATES = ("terminated",)
POLL_SECONDS = 5.0
# After a launch with no usable reply: how long to look for the instance before deciding the
# launch did not happen, and how often to launch at most.
LOOKUP_ATTEMPTS = 3
LOOKUP_INTERVAL_SECONDS = 5.0
LAUNCH_ATTEMPTS = 3
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


def lenslab_instances(client: LambdaClient, name: str) -> list[Instance]:
    """Every instance called ``name`` that is not terminated (booting, active, unhealthy, ...)."""
    return [i for i in client.instances() if i.name == name and i.status not in GONE_STATES]


def best_instance(instances: list[Instance]) -> Instance | None:
    """The one to use: active before booting; an unusable one (unhealthy, ...) only when
    nothing else exists, so that it can still be seen and terminated."""
    rank = {"active": 0, "booting": 1}
    return min(instances, key=lambda i: rank.get(i.status, 2), default=None)


def find_instance(client: LambdaClient, name: str) -> Instance | None:
    """The usable instance called ``name``, if any."""
    found = best_instance(lenslab_instances(client, name))
    return found if found is not None and found.status in USABLE_STATES else None


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
    on_launched: Callable[[str], None] | None = None,
) -> tuple[Instance, FileSystem]:
    """Register the key and create the file system when missing, launch once, wait until
    active. ``on_launched(id)`` runs as soon as the launch returns an id, before the wait."""
    if plan.register_ssh_key:
        ensure_ssh_key(client, plan.ssh_key_name, public_key)
    file_system = ensure_file_system(client, plan.file_system, plan.offer.region)
    instance_id = launch_instance(client, plan, sleep)
    if on_launched is not None:
        on_launched(instance_id)
    return wait_until_active(client, instance_id, boot_timeout, sleep, clock), file_system


def ensure_ssh_key(client: LambdaClient, name: str, public_key: str) -> None:
    """Register the key as ``name``; one added with its reply lost is found by its name."""
    for attempt in (1, 2):
        try:
            client.add_ssh_key(name, public_key)
            return
        except LambdaError as exc:
            # Only our own key counts: another key of that name would lock lenslab out.
            if any(k.name == name and k.public_key.split()[:2] == public_key.split()[:2] for k in client.ssh_keys()):
                return
            if attempt == 2 or not isinstance(exc, OutcomeUnknown):
                raise


def ensure_file_system(client: LambdaClient, name: str, region: str) -> FileSystem:
    """The file system called ``name``, created when missing; a create whose reply was lost is
    found by its name, and sent once more only when it is not there."""
    for attempt in (1, 2):
        existing = next((fs for fs in client.file_systems() if fs.name == name), None)
        if existing is not None:
            return existing
        try:
            return client.create_file_system(name, region)
        except OutcomeUnknown:
            if attempt == 2:
                raise
        except LambdaError:
            # "Already exists" after an earlier create whose reply was lost: it is listed.
            found = next((fs for fs in client.file_systems() if fs.name == name), None)
            if found is None:
                raise
            return found
    raise AssertionError("unreachable: the last attempt returns or raises")


def launch_instance(client: LambdaClient, plan: LaunchPlan, sleep: Callable[[float], None] = time.sleep) -> str:
    """Launch and return the instance's id; never launches twice for one lost reply.

    A launch with no usable reply may have happened: lenslab looks for an instance with the
    plan's name first and uses it when found. Only when none appears is the launch sent again
    (a garbled reply is not re-sent: something other than a lost packet is wrong)."""
    for attempt in range(1, LAUNCH_ATTEMPTS + 1):
        try:
            return client.launch(
                plan.offer.region, plan.offer.instance_type.name, plan.ssh_key_name, [plan.file_system], plan.name
            )
        except OutcomeUnknown as exc:
            found = _look_for(client, plan.name, sleep)
            if found is not None:
                return found.id
            if attempt == LAUNCH_ATTEMPTS or exc.code != "lenslab/no-reply":
                raise OutcomeUnknown(
                    f"{exc.message}; no instance named {plan.name} appeared, so none is billing", exc.fix, code=exc.code
                ) from exc
    raise AssertionError("unreachable: the last attempt returns or raises")


def _look_for(client: LambdaClient, name: str, sleep: Callable[[float], None]) -> Instance | None:
    # A launch Lambda accepted may take a moment to show in the listing.
    for attempt in range(LOOKUP_ATTEMPTS):
        if attempt:
            sleep(LOOKUP_INTERVAL_SECONDS)
        found = best_instance(lenslab_instances(client, name))
        if found is not None:
            return found
    return None


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
        if instance.status not in USABLE_STATES:
            reason = f"went {instance.status}"
        elif clock() >= deadline:
            reason = f"was still {instance.status} after {timeout:.0f} s"
        else:
            sleep(POLL_SECONDS)
            continue
        terminate_quietly(client, instance_id)
        raise BootFailed(
            f"instance {instance.name or instance_id} {reason}; lenslab terminated it so it does not bill",
            "run `lenslab up` again (another instance is launched), or choose another GPU type or region",
        )


def terminate_quietly(client: LambdaClient, instance_id: str) -> None:
    """Terminate; an instance that is already gone (or unknown) is what we wanted."""
    with contextlib.suppress(ObjectDoesNotExist):
        client.terminate([instance_id])


def terminate_all(client: LambdaClient, name: str) -> list[str]:
    """Terminate every instance called ``name`` that is not terminated; their ids. One call
    per instance, so that one already gone does not stop the others."""
    ids = [i.id for i in lenslab_instances(client, name) if i.status != "terminating"]
    for instance_id in ids:
        terminate_quietly(client, instance_id)
    return ids
