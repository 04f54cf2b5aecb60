"""RunPod's records as lenslab reads them, and the GraphQL documents that ask for them.

Field names follow runpod-python's queries (``runpod/api/queries/pods.py``,
``runpod/api/queries/gpus.py``) and RunPod's GraphQL spec (graphql-spec.runpod.io); each reply
is checked with ``Shape`` where it enters, so a wrong one is one line naming the endpoint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from lenslab.providers.container_box import BOX_SSH_PORT, STOCK_SSH_PORT
from lenslab.providers.offers import (
    PREEMPTED,
    RUNNING,
    STARTING,
    STOPPED,
    TERMINATED,
    UNKNOWN,
    Instance,
    Offer,
    Shape,
)

SSH_PORTS = (BOX_SSH_PORT, STOCK_SSH_PORT)  # the container's sshd, in order of preference

PROVIDER = "RunPod"
FIX = "RunPod may be having trouble, or the RunPod API URL points at something else; try again later"

POD_FIELDS = """
  id name desiredStatus podType costPerHr gpuCount imageName machineId
  runtime { uptimeInSeconds ports { ip isIpPublic privatePort publicPort type } }
  machine { gpuDisplayName }
"""

# Prices per GPU type; lowestPrice answers for a GPU count (and a data center and cloud, when given);
# its stockStatus is null where none is free.
GPU_TYPES = """
query GpuTypes($lowest: GpuLowestPriceInput!) {
  gpuTypes { id displayName memoryInGb securePrice communityPrice
    lowestPrice(input: $lowest) { minimumBidPrice uninterruptablePrice stockStatus } }
}"""


def _with_pod(head: str, call: str) -> str:
    """``head { call { <pod fields> } }``: every pod query and create answers the same fields."""
    return head + " { " + call + " {" + POD_FIELDS + "} }"


MY_PODS = "query Pods { myself { pods {" + POD_FIELDS + "} } }"
ONE_POD = _with_pod("query Pod($input: PodFilter!)", "pod(input: $input)")
DEPLOY = _with_pod("mutation Deploy($input: PodFindAndDeployOnDemandInput!)", "podFindAndDeployOnDemand(input: $input)")
RENT_SPOT = _with_pod("mutation Rent($input: PodRentInterruptableInput!)", "podRentInterruptable(input: $input)")
STOP = "mutation Stop($input: PodStopInput!) { podStop(input: $input) { id desiredStatus } }"
RESUME = "mutation Resume($input: PodResumeInput!) { podResume(input: $input) { id desiredStatus } }"
BID_RESUME = "mutation BidResume($input: PodBidResumeInput!) { podBidResume(input: $input) { id desiredStatus } }"
TERMINATE = "mutation Terminate($input: PodTerminateInput!) { podTerminate(input: $input) }"


@dataclass(frozen=True)
class PodSpec:
    """What a pod is made from (the fields of PodFindAndDeployOnDemandInput lenslab sets)."""

    name: str  # lenslab's name for it: how a create whose reply was lost is found again
    image_name: str  # the container image; the pod *is* this container
    gpu_type_id: str  # e.g. "NVIDIA A100 80GB PCIe" (GpuType.id)
    gpu_count: int = 1
    cloud_type: str = "ALL"  # SECURE | COMMUNITY | ALL
    data_center_id: str | None = None  # required with a network volume: the volume's data center
    network_volume_id: str | None = None  # mounted at volume_mount_path; outlives the pod
    volume_mount_path: str = "/lab"  # the container-box contract's persistent root
    container_disk_in_gb: int = 20  # scratch, lost on stop
    volume_in_gb: int = 0  # pod volume (lost on terminate); 0 when a network volume is used
    ports: str = "2222/tcp"  # the box's sshd, reached through a public TCP port mapped to it
    env: dict[str, str] = field(default_factory=dict)
    docker_args: str = ""  # the container's command line; "" keeps the image's own

    def graphql_input(self) -> dict[str, Any]:
        values: dict[str, Any] = {
            "name": self.name,
            "imageName": self.image_name,
            "gpuTypeId": self.gpu_type_id,
            "gpuCount": self.gpu_count,
            "cloudType": self.cloud_type,
            "containerDiskInGb": self.container_disk_in_gb,
            "volumeInGb": self.volume_in_gb,
            "volumeMountPath": self.volume_mount_path,
            "ports": self.ports,
            "startSsh": True,
            "supportPublicIp": True,
            "dockerArgs": self.docker_args,
            "env": [{"key": k, "value": v} for k, v in sorted(self.env.items())],
        }
        if self.data_center_id is not None:
            values["dataCenterId"] = self.data_center_id
        if self.network_volume_id is not None:
            values["networkVolumeId"] = self.network_volume_id
        return values


@dataclass(frozen=True)
class GpuType:
    id: str  # what PodSpec.gpu_type_id takes, e.g. "NVIDIA A100 80GB PCIe"
    display_name: str  # e.g. "A100 PCIe"
    memory_gb: float  # one GPU's memory
    secure_price: float | None  # $/GPU-hour on Secure Cloud, None when not offered there
    community_price: float | None  # $/GPU-hour on Community Cloud
    on_demand_price: float | None  # lowestPrice.uninterruptablePrice: $/GPU-hour now, for the count asked
    minimum_bid: float | None  # lowestPrice.minimumBidPrice: the lowest spot bid, $/GPU-hour
    stock_status: str | None  # "High" | "Medium" | "Low" | None (none free)

    def offer(self, gpu_count: int, data_center_id: str | None) -> Offer:
        on_demand = self.on_demand_price
        return Offer(
            provider="runpod",
            offer_id=self.id,
            gpu_name=self.display_name,
            gpu_count=gpu_count,
            vram_gb=self.memory_gb,
            region=data_center_id or "",
            price_on_demand=None if on_demand is None else round(on_demand * gpu_count, 4),
            price_interruptible=None if self.minimum_bid is None else round(self.minimum_bid * gpu_count, 4),
            available=self.stock_status is not None and (on_demand is not None or self.minimum_bid is not None),
            persistent_storage=True,  # a network volume in the data center outlives every pod
        )


@dataclass(frozen=True)
class Pod:
    id: str
    name: str
    desired_status: str  # RUNNING | EXITED | TERMINATED (RunPod's own word)
    interruptible: bool  # podType INTERRUPTABLE: a spot pod
    cost_per_hr: float | None  # $/h while running
    gpu_count: int
    gpu_name: str  # machine.gpuDisplayName
    started: bool  # runtime reported: the container is up
    ssh_host: str | None  # the public IP mapped to the container's sshd port
    ssh_port: int | None
    # runtime.uptimeInSeconds: how long the container has run (RunPod records no creation time).
    uptime_seconds: float | None = None

    def instance(self) -> Instance:
        return Instance(
            provider="runpod",
            id=self.id,
            name=self.name,
            state=pod_state(self),
            provider_status=self.desired_status,
            interruptible=self.interruptible,
            gpu_name=self.gpu_name,
            gpu_count=self.gpu_count,
            price_per_hour=self.cost_per_hr,
            ssh_host=self.ssh_host,
            ssh_port=self.ssh_port,
            created_at=None if self.uptime_seconds is None else time.time() - self.uptime_seconds,
        )


@dataclass(frozen=True)
class NetworkVolume:
    id: str
    name: str  # lenslab-<project>
    size_gb: int
    data_center_id: str  # a volume is bound to its data center: pods using it launch there


def pod_state(pod: Pod) -> str:
    """RunPod's desiredStatus and runtime as one of lenslab's states. A spot pod that RunPod
    took back reads EXITED, like one its owner stopped: both come back the same way (a bid
    resume), so an exited spot pod is reported PREEMPTED."""
    status = pod.desired_status.upper()
    if status == "TERMINATED":
        return TERMINATED
    if status == "EXITED":
        return PREEMPTED if pod.interruptible else STOPPED
    if status in {"CREATED", "RESTARTING"}:
        return STARTING
    if status == "RUNNING":
        return RUNNING if pod.started else STARTING
    return UNKNOWN


def gpu_type(shape: Shape, entry: Any, where: str) -> GpuType:
    item = shape.obj(entry, where)
    lowest = item.get("lowestPrice")
    low = {} if lowest is None else shape.obj(lowest, f"{where}.lowestPrice")
    stock = shape.text(low, "stockStatus", f"{where}.lowestPrice", optional=True)
    return GpuType(
        id=shape.text(item, "id", where) or "",
        display_name=shape.text(item, "displayName", where) or "",
        memory_gb=shape.number(item, "memoryInGb", where) or 0.0,
        secure_price=_priced(shape.number(item, "securePrice", where, optional=True)),
        community_price=_priced(shape.number(item, "communityPrice", where, optional=True)),
        on_demand_price=_priced(shape.number(low, "uninterruptablePrice", f"{where}.lowestPrice", optional=True)),
        minimum_bid=_priced(shape.number(low, "minimumBidPrice", f"{where}.lowestPrice", optional=True)),
        stock_status=stock,
    )


def pod(shape: Shape, entry: Any, where: str, ssh_ports: tuple[int, ...] = SSH_PORTS) -> Pod:
    """A pod; its SSH address is the public one mapped to the first of ``ssh_ports`` the
    container exposes (lenslab's image: 2222; a stock image's sshd: 22)."""
    item = shape.obj(entry, where)
    runtime = item.get("runtime")
    host, port, uptime = None, None, None
    rank = len(ssh_ports)
    if runtime is not None:
        uptime = shape.number(
            shape.obj(runtime, f"{where}.runtime"), "uptimeInSeconds", f"{where}.runtime", optional=True
        )
        ports = shape.obj(runtime, f"{where}.runtime").get("ports") or []
        for index, raw in enumerate(shape.items(ports, f"{where}.runtime.ports")):
            at = f"{where}.runtime.ports[{index}]"
            entry_ = shape.obj(raw, at)
            public = shape.flag(entry_, "isIpPublic", at, optional=True)
            private = shape.whole(entry_, "privatePort", at, optional=True)
            if public and private in ssh_ports and ssh_ports.index(private) < rank:
                rank = ssh_ports.index(private)
                host = shape.text(entry_, "ip", at)
                port = shape.whole(entry_, "publicPort", at)
    machine, gpu_name = item.get("machine"), None
    if machine is not None:
        at = f"{where}.machine"
        gpu_name = shape.text(shape.obj(machine, at), "gpuDisplayName", at, optional=True)
    return Pod(
        id=shape.text(item, "id", where) or "",
        name=shape.text(item, "name", where, optional=True) or "",
        desired_status=shape.text(item, "desiredStatus", where) or "",
        interruptible=(shape.text(item, "podType", where, optional=True) or "").upper() == "INTERRUPTABLE",
        cost_per_hr=shape.number(item, "costPerHr", where, optional=True),
        gpu_count=shape.whole(item, "gpuCount", where, optional=True) or 0,
        gpu_name=gpu_name or "",
        started=runtime is not None,
        ssh_host=host,
        ssh_port=port,
        uptime_seconds=uptime,
    )


def network_volume(shape: Shape, entry: Any, where: str) -> NetworkVolume:
    item = shape.obj(entry, where)
    return NetworkVolume(
        id=shape.text(item, "id", where) or "",
        name=shape.text(item, "name", where) or "",
        size_gb=shape.whole(item, "size", where) or 0,
        data_center_id=shape.text(item, "dataCenterId", where) or "",
    )


def _priced(value: float | None) -> float | None:
    """RunPod reports 0 for "not offered there"; lenslab says None."""
    return value if value else None
