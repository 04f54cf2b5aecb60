"""A stateful emulator of RunPod's API (GraphQL for pods and prices, REST v1 for network
volumes), for tests and benchmarks: no cloud is reachable.

It follows what runpod-python sends and reads: ``POST /graphql`` with a bearer key (HTTP 401
without one), answers ``{"data": {<root>: ...}}``, and failures as HTTP 200 with
``{"errors": [{"message", "path", "extensions": {"code": "RUNPOD"}}], "data": {<root>: null}}``
(RunPod's own words for no capacity and for a resume without a free GPU, as reported in
runpod-python's GitHub tracker, #21 and #168, shows them; the balance message is lenslab's guess, matched by words);
REST failures carry ``{"error", "detail", "status"}`` (runpod-python's ``rest.py`` reads ``detail``).
The operation is recognised by its root field and read from the GraphQL variables (lenslab's
client sends every value as a variable), which is all the emulator needs of GraphQL.

State: GPU types with free GPUs per data center, pods (on-demand and spot) with a lifecycle
(RUNNING without runtime while booting, then with a public port 22; EXITED; gone when
terminated), network volumes that are host directories and outlive pods, and a balance.
Faults: a wrong key, no capacity (``stock``), an empty balance, 429 storms, latency and bad
replies (``HttpEmulator``), pods stuck booting, a lost reply after a create
(``drop_create_replies``), and ``preempt(pod_id)`` (a spot pod goes EXITED, or away).
Instances are real containers when ``runner`` (``InstanceRunner``) is set: a booting pod runs
its image, ``dockerArgs`` and ``env`` with its network volume's directory (else a directory of
its own) at /lab and its TCP port (``ports``, e.g. "2222/tcp") published; the pod's runtime
then shows that public port. Without a runner the hooks decide: ``on_launch(pod) -> (ssh_host,
ssh_port) | None`` when a pod starts, ``on_stop(pod)`` when it stops or is preempted,
``on_terminate(pod)`` when it is removed.
"""

from __future__ import annotations

import itertools
import re
import shlex
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.http_emulator import DROP, HttpEmulator, Reply
from tests.support.instance_runner import InstanceRunner, Launch


@dataclass
class EmulatedGpu:
    id: str
    display_name: str
    memory_gb: int
    secure_price: float  # $/GPU-hour on demand
    min_bid: float  # lowest spot bid, $/GPU-hour
    stock: dict[str, int] = field(default_factory=dict)  # data center -> free GPUs


def default_gpus() -> list[EmulatedGpu]:
    return [
        EmulatedGpu("NVIDIA A100 80GB PCIe", "A100 PCIe", 80, 1.64, 0.82, {"EU-RO-1": 8, "US-GA-1": 2}),
        EmulatedGpu("NVIDIA GeForce RTX 4090", "RTX 4090", 24, 0.69, 0.29, {"EU-RO-1": 4}),
        EmulatedGpu("NVIDIA H100 80GB HBM3", "H100 SXM", 80, 2.99, 1.75, {}),
    ]


NO_CAPACITY = (
    "There are no longer any instances available with the requested specifications. Please refresh and try again."
)
NO_FUNDS = "You do not have enough funds to rent this pod. Please add funds to your account."
ROOTS = "podFindAndDeployOnDemand|podRentInterruptable|podStop|podBidResume|podResume|podTerminate|gpuTypes|myself|pod"
ROOT = re.compile(rf"\b({ROOTS})\s*[({{]")
PodHook = Callable[[dict[str, Any]], Any]


class RunPodEmulator(HttpEmulator):
    def __init__(self, volume_root: Path, api_key: str = "rp-test-key-0123456789abcdef") -> None:
        super().__init__(api_key)
        self.volume_root = volume_root
        self.gpus = {g.id: g for g in default_gpus()}
        self.pods: dict[str, dict[str, Any]] = {}
        self.created: list[str] = []  # every pod ever created, in order (a launch made twice shows here)
        self.volumes: dict[str, dict[str, Any]] = {}
        self.data_centers = {"EU-RO-1", "US-GA-1", "US-TX-3"}
        self.balance = 100.0  # $; a launch needs at least an hour of the pod's price
        self.boot_seconds = 0.0
        self.stuck_starting = False  # pods never get a runtime
        self.drop_create_replies = 0  # the next N creates happen, and their replies are lost
        self.on_launch: PodHook | None = None
        self.on_stop: PodHook | None = None
        self.on_terminate: PodHook | None = None
        self.runner: InstanceRunner | None = None
        self._ports = itertools.count(40022)

    @property
    def graphql_url(self) -> str:
        return self.origin + "/graphql"

    @property
    def rest_url(self) -> str:
        return self.origin + "/v1"

    def live_pods(self) -> list[dict[str, Any]]:
        return list(self.pods.values())

    def preempt(self, pod_id: str, *, remove: bool = False) -> None:
        """RunPod takes a spot pod back: it exits (kept, resumable with a bid) or is removed."""
        with self._lock:
            pod = self.pods[pod_id]
            assert pod["podType"] == "INTERRUPTABLE", "only spot pods are preempted"
            self._halt(pod, self.on_stop)
            if remove:
                self._remove(pod)

    # -- dispatch ----------------------------------------------------------------------------

    def handle(self, method: str, path: str, query: dict[str, str], auth: str, body: Any) -> Reply:
        if not self.authorized(auth):
            if path == "/graphql":
                return Reply(401, {"errors": [{"message": "Unauthorized"}]})
            return Reply(401, {"error": "Unauthorized", "status": 401})
        if path == "/graphql" and method == "POST":
            return self._graphql(body)
        if path == "/v1/networkvolumes" and method == "GET":
            return Reply(200, [_public(v) for v in self.volumes.values()])
        if path == "/v1/networkvolumes" and method == "POST":
            return self._create_volume(body)
        if path.startswith("/v1/networkvolumes/") and method == "DELETE":
            return self._delete_volume(path.rsplit("/", 1)[-1])
        return _rest_error(404, f"no route {method} {path}")

    def _graphql(self, body: Any) -> Reply:
        if not isinstance(body, dict) or not isinstance(body.get("query"), str):
            return Reply(400, {"errors": [{"message": "Must provide query string."}]})
        match = ROOT.search(body["query"])
        if match is None:
            return Reply(400, {"errors": [{"message": "Unknown operation."}]})
        root, variables = match.group(1), body.get("variables") or {}
        operation = getattr(self, "_op_" + root)
        try:
            value = operation(variables)
        except GraphQLFailure as failure:
            return Reply(200, {"errors": [_gql_error(str(failure), root)], "data": {root: None}})
        if root in {"podFindAndDeployOnDemand", "podRentInterruptable"} and self.drop_create_replies > 0:
            self.drop_create_replies -= 1
            return DROP
        return Reply(200, {"data": {root: value}})

    # -- offers and pods -----------------------------------------------------------------------

    def _op_gpuTypes(self, variables: dict[str, Any]) -> list[dict[str, Any]]:
        lowest = variables.get("lowest") or {}
        count, center = int(lowest.get("gpuCount", 1)), lowest.get("dataCenterId")
        return [self._gpu_entry(g, count, center) for g in self.gpus.values()]

    def _gpu_entry(self, gpu: EmulatedGpu, count: int, center: str | None) -> dict[str, Any]:
        free = gpu.stock.get(center, 0) if center else max(gpu.stock.values(), default=0)
        available = free >= count
        return {
            "id": gpu.id,
            "displayName": gpu.display_name,
            "memoryInGb": gpu.memory_gb,
            "securePrice": gpu.secure_price,
            "communityPrice": round(gpu.secure_price * 0.8, 2),
            "lowestPrice": {
                "minimumBidPrice": gpu.min_bid if available else None,
                "uninterruptablePrice": gpu.secure_price if available else None,
                "stockStatus": ("High" if free >= 4 else "Low") if available else None,
            },
        }

    def _op_podFindAndDeployOnDemand(self, variables: dict[str, Any]) -> dict[str, Any]:
        return self._deploy(variables.get("input") or {}, bid=None)

    def _op_podRentInterruptable(self, variables: dict[str, Any]) -> dict[str, Any]:
        spec = variables.get("input") or {}
        return self._deploy(spec, bid=float(spec.get("bidPerGpu") or 0))

    def _deploy(self, spec: dict[str, Any], bid: float | None) -> dict[str, Any]:
        gpu = self.gpus.get(spec.get("gpuTypeId", ""))
        if gpu is None:
            raise GraphQLFailure("Invalid GPU type.")
        count = int(spec.get("gpuCount") or 1)
        center = spec.get("dataCenterId")
        volume_id = spec.get("networkVolumeId")
        if volume_id is not None:
            volume = self.volumes.get(volume_id)
            if volume is None:
                raise GraphQLFailure("Network volume not found.")
            if center not in (None, volume["dataCenterId"]):
                raise GraphQLFailure("Network volume is in a different data center.")
            center = volume["dataCenterId"]
        if bid is not None and bid < gpu.min_bid:
            raise GraphQLFailure(f"Your bid is below the minimum bid of ${gpu.min_bid}/GPU/hr.")
        candidates = [center] if center else sorted(gpu.stock, key=lambda c: -gpu.stock[c])
        center = next((c for c in candidates if gpu.stock.get(c, 0) >= count), None)
        if center is None:
            raise GraphQLFailure(NO_CAPACITY)
        price = round((bid if bid is not None else gpu.secure_price) * count, 4)
        if self.balance < price:
            raise GraphQLFailure(NO_FUNDS)
        gpu.stock[center] -= count
        pod = {
            "id": uuid.uuid4().hex[:14],
            "name": spec.get("name", ""),
            "desiredStatus": "RUNNING",
            "podType": "INTERRUPTABLE" if bid is not None else "RESERVED",
            "costPerHr": price,
            "gpuCount": count,
            "imageName": spec.get("imageName", ""),
            "machineId": uuid.uuid4().hex[:12],
            "machine": {"gpuDisplayName": gpu.display_name},
            "runtime": None,
            "_gpu": gpu.id,
            "_center": center,
            "_volume": volume_id,
            "_bid": bid,
            "_spec": spec,
        }
        self.pods[pod["id"]] = pod
        self.created.append(pod["id"])
        self._boot(pod)
        return self._view(pod)

    def _boot(self, pod: dict[str, Any]) -> None:
        pod["_started"] = time.monotonic()
        spec = pod["_spec"]
        tcp = [p for p in str(spec.get("ports") or "22/tcp").split(",") if p.strip().endswith("/tcp")]
        pod["_private_port"] = int(tcp[0].strip().split("/")[0]) if tcp else 22
        endpoint = self.on_launch(_public(pod)) if self.on_launch is not None else None
        if self.runner is not None and not self.stuck_starting:
            endpoint = self.runner.start(self._launch(pod))
        pod["_ssh"] = endpoint or ("127.0.0.1", next(self._ports))

    def _launch(self, pod: dict[str, Any]) -> Launch:
        spec = pod["_spec"]
        volume = self.volumes.get(pod["_volume"] or "")
        directory = Path(volume["_directory"]) if volume else self.volume_root / "pods" / pod["id"]
        return Launch(
            key=pod["id"],
            image=str(spec.get("imageName") or ""),
            command=tuple(shlex.split(str(spec.get("dockerArgs") or ""))),
            env={str(e["key"]): str(e["value"]) for e in spec.get("env") or []},
            volume=directory,
            port=pod["_private_port"],
        )

    def _view(self, pod: dict[str, Any]) -> dict[str, Any]:
        """The pod as the API shows it: a runtime (with port 22) once it has booted."""
        booted = time.monotonic() - pod.get("_started", 0.0) >= self.boot_seconds
        if pod["desiredStatus"] == "RUNNING" and booted and not self.stuck_starting:
            host, port = pod["_ssh"]
            pod["runtime"] = {
                "uptimeInSeconds": int(time.monotonic() - pod["_started"]),
                "ports": [
                    {
                        "ip": host,
                        "isIpPublic": True,
                        "privatePort": pod["_private_port"],
                        "publicPort": port,
                        "type": "tcp",
                    }
                ],
            }
        return _public(pod)

    def _op_myself(self, _: dict[str, Any]) -> dict[str, Any]:
        return {"pods": [self._view(p) for p in self.pods.values()]}

    def _op_pod(self, variables: dict[str, Any]) -> dict[str, Any] | None:
        pod = self.pods.get((variables.get("input") or {}).get("podId", ""))
        return None if pod is None else self._view(pod)

    def _pod_of(self, variables: dict[str, Any]) -> dict[str, Any]:
        pod = self.pods.get((variables.get("input") or {}).get("podId", ""))
        if pod is None:
            raise GraphQLFailure("Pod not found.")
        return pod

    def _op_podStop(self, variables: dict[str, Any]) -> dict[str, Any]:
        pod = self._pod_of(variables)
        if pod["desiredStatus"] == "RUNNING":
            self._halt(pod, self.on_stop)
        return {"id": pod["id"], "desiredStatus": pod["desiredStatus"]}

    def _op_podResume(self, variables: dict[str, Any]) -> dict[str, Any]:
        pod = self._pod_of(variables)
        if pod["podType"] == "INTERRUPTABLE":
            raise GraphQLFailure("This pod is a spot pod: resume it with podBidResume.")
        return self._resume(pod)

    def _op_podBidResume(self, variables: dict[str, Any]) -> dict[str, Any]:
        pod = self._pod_of(variables)
        bid = float((variables.get("input") or {}).get("bidPerGpu") or 0)
        if bid < self.gpus[pod["_gpu"]].min_bid:
            raise GraphQLFailure(f"Your bid is below the minimum bid of ${self.gpus[pod['_gpu']].min_bid}/GPU/hr.")
        pod["_bid"], pod["costPerHr"] = bid, round(bid * pod["gpuCount"], 4)
        return self._resume(pod)

    def _resume(self, pod: dict[str, Any]) -> dict[str, Any]:
        if pod["desiredStatus"] != "RUNNING":
            gpu = self.gpus[pod["_gpu"]]
            if gpu.stock.get(pod["_center"], 0) < pod["gpuCount"]:
                raise GraphQLFailure("There are not enough free GPUs on the host machine to start this pod.")
            gpu.stock[pod["_center"]] -= pod["gpuCount"]
            pod["desiredStatus"] = "RUNNING"
            self._boot(pod)
        return {"id": pod["id"], "desiredStatus": pod["desiredStatus"]}

    def _op_podTerminate(self, variables: dict[str, Any]) -> None:
        self._remove(self._pod_of(variables))

    def _halt(self, pod: dict[str, Any], hook: PodHook | None) -> None:
        if pod["desiredStatus"] == "RUNNING":
            self.gpus[pod["_gpu"]].stock[pod["_center"]] += pod["gpuCount"]
        pod["desiredStatus"], pod["runtime"] = "EXITED", None
        if self.runner is not None:
            self.runner.stop(pod["id"])
        if hook is not None:
            hook(_public(pod))

    def _remove(self, pod: dict[str, Any]) -> None:
        if pod["desiredStatus"] == "RUNNING":
            self.gpus[pod["_gpu"]].stock[pod["_center"]] += pod["gpuCount"]
        del self.pods[pod["id"]]
        pod["desiredStatus"] = "TERMINATED"
        if self.runner is not None:
            self.runner.remove(pod["id"])
        if not pod["_volume"]:
            shutil.rmtree(self.volume_root / "pods" / pod["id"], ignore_errors=True)  # a pod volume dies with it
        if self.on_terminate is not None:
            self.on_terminate(_public(pod))

    # -- network volumes (REST v1) ---------------------------------------------------------------

    def _create_volume(self, body: Any) -> Reply:
        if not isinstance(body, dict):
            return _rest_error(400, "body must be an object")
        name, size, center = body.get("name"), body.get("size"), body.get("dataCenterId")
        if not isinstance(name, str) or not name or not isinstance(size, int) or not 1 <= size <= 4000:
            return _rest_error(400, "name (1-255 characters) and size (1-4000 GB) are required")
        if center not in self.data_centers:
            return _rest_error(400, f"unknown data center {center!r}")
        directory = self.volume_root / name
        directory.mkdir(parents=True, exist_ok=True)
        volume = {"id": uuid.uuid4().hex[:10], "name": name, "size": size, "dataCenterId": center}
        volume["_directory"] = str(directory)
        self.volumes[volume["id"]] = volume
        if self.drop_create_replies > 0:
            self.drop_create_replies -= 1
            return DROP
        return Reply(200, _public(volume))

    def _delete_volume(self, volume_id: str) -> Reply:
        volume = self.volumes.get(volume_id)
        if volume is None:
            return _rest_error(404, "network volume not found")
        if any(p["_volume"] == volume_id for p in self.pods.values()):
            return _rest_error(400, "network volume is in use by a pod")
        del self.volumes[volume_id]
        shutil.rmtree(volume["_directory"], ignore_errors=True)
        return Reply(204)


class GraphQLFailure(Exception):
    """An operation RunPod refuses: answered as HTTP 200 with an ``errors`` array."""


def _gql_error(message: str, root: str) -> dict[str, Any]:
    return {"message": message, "path": [root], "extensions": {"code": "RUNPOD"}}


def _rest_error(status: int, message: str) -> Reply:
    return Reply(status, {"error": message, "detail": message, "status": status})


def _public(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if not k.startswith("_")}
