"""vast.ai's records as lenslab reads them (field names as in vast-ai/vast-python ``vast.py``),
each checked with ``Shape`` where it enters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lenslab.providers.container_box import BOX_SSH_PORT, STOCK_SSH_PORT
from lenslab.providers.offers import (
    PREEMPTED,
    RUNNING,
    STARTING,
    STOPPED,
    UNKNOWN,
    Instance,
    Offer,
    Shape,
)

SSH_PORTS = (BOX_SSH_PORT, STOCK_SSH_PORT)  # the container's sshd, in order of preference

PROVIDER = "vast.ai"
FIX = "vast.ai may be having trouble, or the vast.ai API URL points at something else; try again later"
# actual_status values while a container is being made or started.
STARTING_STATUSES = frozenset({"", "created", "loading", "scheduling", "starting", "connecting"})


@dataclass(frozen=True)
class InstanceSpec:
    """What an instance is made from (the body of ``PUT /asks/{id}/`` lenslab sets).

    ``env`` is vast.py's ``parse_env`` result: variables, plus a key ``"-p 2222:2222"`` (value
    "1") for each port to map. With ``args`` the runtype is "args": vast.ai runs the image with
    these arguments as its command, and adds no sshd of its own."""

    label: str  # lenslab's name for it: how a create whose reply was lost is found again
    image: str  # the container image; the instance *is* this container
    disk_gb: float = 32.0  # the instance's disk: kept while stopped, lost when destroyed
    onstart: str = ""  # a shell script run when the container starts (runtype ssh)
    env: dict[str, str] = field(default_factory=dict)
    runtype: str = "ssh_direc ssh_proxy"  # vast.py --ssh --direct: sshd reachable directly and by proxy
    args: tuple[str, ...] = ()  # the container's command (runtype "args")

    def payload(self, bid_price: float | None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "client_id": "me",
            "image": self.image,
            "env": dict(self.env),
            "price": bid_price,  # set: an interruptible instance bidding this $/h; null: on demand
            "disk": self.disk_gb,
            "label": self.label,
            "onstart": self.onstart,
            "runtype": "args" if self.args else self.runtype,
        }
        if self.args:
            body["args"] = list(self.args)
        return body


@dataclass(frozen=True)
class VastOffer:
    id: str  # the ask id that PUT /asks/{id}/ takes
    gpu_name: str  # e.g. "RTX 4090"
    num_gpus: int
    gpu_ram_gb: float  # one GPU's memory (the API counts MB)
    geolocation: str  # e.g. "Texas, US"; "" when not reported
    dph_total: float | None  # on-demand $/h for the whole offer
    min_bid: float | None  # the lowest interruptible bid, $/h for the whole offer
    rentable: bool
    reliability: float | None  # vast.ai's machine reliability score, 0..1

    def offer(self) -> Offer:
        return Offer(
            provider="vast",
            offer_id=self.id,
            gpu_name=self.gpu_name,
            gpu_count=self.num_gpus,
            vram_gb=self.gpu_ram_gb,
            region=self.geolocation,
            price_on_demand=self.dph_total,
            price_interruptible=self.min_bid,
            available=self.rentable,
            # An instance's disk is lost when it is destroyed, and nothing else outlives it here:
            # runs must be mirrored (resilience.mirror) to survive a new instance.
            persistent_storage=False,
        )


@dataclass(frozen=True)
class VastInstance:
    id: str
    label: str  # what lenslab named it ("" for instances lenslab did not make)
    actual_status: str  # what the container is doing: loading | running | exited | offline | ""
    intended_status: str  # what its owner asked for: running | stopped
    cur_state: str  # the machine's view: running | stopped | unloaded
    is_bid: bool  # an interruptible instance
    dph_total: float | None  # $/h while running
    gpu_name: str
    num_gpus: int
    ssh_host: str | None  # public_ipaddr, once the box's sshd port is mapped
    ssh_port: int | None  # the public port mapped to the box's sshd port (``ports``)
    start_date: float | None = None  # epoch seconds: when it was created

    def normalised(self) -> Instance:
        return Instance(
            provider="vast",
            id=self.id,
            name=self.label,
            state=instance_state(self),
            provider_status=f"{self.intended_status or '?'}/{self.actual_status or '?'}",
            interruptible=self.is_bid,
            gpu_name=self.gpu_name,
            gpu_count=self.num_gpus,
            price_per_hour=self.dph_total,
            ssh_host=self.ssh_host,
            ssh_port=self.ssh_port,
            created_at=self.start_date,
        )


def instance_state(row: VastInstance) -> str:
    """An instance's statuses as one of lenslab's states. An interruptible instance that lost
    its bid keeps ``intended_status`` running (vast.ai starts it again once the bid leads) while
    its container has exited: that is PREEMPTED (outbid)."""
    intended, actual = row.intended_status.lower(), row.actual_status.lower()
    if intended == "stopped":
        return STOPPED
    if actual == "running":
        return RUNNING
    if actual in {"exited", "stopped", "offline"} or row.cur_state.lower() == "stopped":
        return PREEMPTED if row.is_bid else STOPPED
    if actual in STARTING_STATUSES:
        return STARTING
    return UNKNOWN


def offer(shape: Shape, entry: Any, where: str) -> VastOffer:
    item = shape.obj(entry, where)
    ram_mb = shape.number(item, "gpu_ram", where) or 0.0
    return VastOffer(
        id=shape.text(item, "id", where) or "",
        gpu_name=shape.text(item, "gpu_name", where) or "",
        num_gpus=shape.whole(item, "num_gpus", where) or 0,
        gpu_ram_gb=round(ram_mb / 1000, 1),
        geolocation=shape.text(item, "geolocation", where, optional=True) or "",
        dph_total=shape.number(item, "dph_total", where, optional=True),
        min_bid=shape.number(item, "min_bid", where, optional=True),
        rentable=bool(shape.flag(item, "rentable", where, optional=True)),
        reliability=shape.number(item, "reliability", where, optional=True),
    )


def instance(shape: Shape, entry: Any, where: str, ssh_ports: tuple[int, ...] = SSH_PORTS) -> VastInstance:
    """An instance; its SSH address is ``public_ipaddr`` and the host port Docker mapped to the
    first of the container's ``ssh_ports`` it exposes (``ports: {"2222/tcp": [{"HostIp",
    "HostPort"}]}``; lenslab's image: 2222, a stock image's sshd: 22)."""
    item = shape.obj(entry, where)
    host, port = None, None
    ports = item.get("ports")
    if ports is not None:
        exposed = shape.obj(ports, f"{where}.ports")
        ssh_port = next((p for p in ssh_ports if f"{p}/tcp" in exposed), ssh_ports[0])
        mapped = exposed.get(f"{ssh_port}/tcp")
        at = f"{where}.ports.{ssh_port}/tcp"
        bindings = [] if mapped is None else shape.items(mapped, at)
        if bindings:
            raw = shape.text(shape.obj(bindings[0], f"{at}[0]"), "HostPort", f"{at}[0]") or ""
            if not raw.isdigit() or not 0 < int(raw) < 65536:
                raise shape.fail(f"{at}[0].HostPort", "expected a port number")
            address = shape.text(item, "public_ipaddr", where, optional=True)
            host, port = (address.strip() or None) if address else None, int(raw)  # vast.ai has sent "ip\n"
    return VastInstance(
        id=shape.text(item, "id", where) or "",
        label=shape.text(item, "label", where, optional=True) or "",
        actual_status=shape.text(item, "actual_status", where, optional=True) or "",
        intended_status=shape.text(item, "intended_status", where, optional=True) or "",
        cur_state=shape.text(item, "cur_state", where, optional=True) or "",
        is_bid=bool(shape.flag(item, "is_bid", where, optional=True)),
        dph_total=shape.number(item, "dph_total", where, optional=True),
        gpu_name=shape.text(item, "gpu_name", where, optional=True) or "",
        num_gpus=shape.whole(item, "num_gpus", where, optional=True) or 0,
        ssh_host=host if port is not None else None,
        ssh_port=port if host is not None else None,
        start_date=shape.number(item, "start_date", where, optional=True),
    )
