"""A stateful emulator of the Lambda Cloud API, for tests and benchmarks (no cloud is reachable).

It follows the published endpoints, payload shapes (``{"data": ...}``), error shapes
(``{"error": {"code", "message", "suggestion"}}``) and rate limits (one launch per
``launch_interval`` seconds). State lives in memory: instance types with per-region capacity,
instances with a lifecycle (booting -> active, or stuck, or unhealthy), file systems that are
directories on the host and outlive instances, SSH keys, a quota and an account switch.

Hooks connect it to real machines: ``on_launch(instance)`` may return the IP of a test VM it
started for that instance, ``on_terminate(instance)`` stops it. The server binds 127.0.0.1.
"""

from __future__ import annotations

import copy
import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


@dataclass
class EmulatedType:
    name: str
    description: str
    gpu_description: str
    price_cents_per_hour: int
    regions_with_capacity: set[str]
    specs: dict[str, Any] = field(
        default_factory=lambda: {"vcpus": 30, "memory_gib": 200, "storage_gib": 512, "gpus": 1}
    )


DEFAULT_TYPES = [
    EmulatedType("gpu_1x_a10", "1x A10 (24 GB PCIe)", "A10 (24 GB PCIe)", 75, {"us-west-1"}),
    EmulatedType("gpu_1x_a100_sxm4", "1x A100 (40 GB SXM4)", "A100 (40 GB SXM4)", 129, {"us-east-1"}),
    EmulatedType("gpu_1x_h100_pcie", "1x H100 (80 GB PCIe)", "H100 (80 GB PCIe)", 249, set()),
]
REGIONS = {"us-east-1": "Virginia, USA", "us-west-1": "California, USA", "europe-central-1": "Germany"}


@dataclass
class Injected:
    status: int
    code: str
    message: str
    path_prefix: str = ""  # only requests whose path starts with this


class LambdaEmulator:
    def __init__(self, fs_root: Path, api_key: str = "secret-test-key-0123456789") -> None:
        self.api_key = api_key
        self.fs_root = fs_root
        self.types = {t.name: copy.deepcopy(t) for t in DEFAULT_TYPES}
        self.instances: dict[str, dict[str, Any]] = {}
        self.file_systems: dict[str, dict[str, Any]] = {}
        self.ssh_keys: dict[str, dict[str, Any]] = {}
        self.quota = 3
        self.account_active = True
        self.boot_seconds = 0.0
        self.stuck_booting = False  # instances never leave "booting"
        self.unhealthy_after_boot = False  # instances go "unhealthy" instead of "active"
        self.launch_interval = 12.0
        self.injected: list[Injected] = []
        self.on_launch: Callable[[dict[str, Any]], str | None] | None = None
        self.on_terminate: Callable[[dict[str, Any]], None] | None = None
        self.requests: list[tuple[str, str, str]] = []  # (method, path, body) for assertions
        self._last_launch: float | None = None
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/api/v1"

    def start(self) -> LambdaEmulator:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def inject(self, status: int, code: str, message: str, times: int = 1, path_prefix: str = "") -> None:
        self.injected.extend(Injected(status, code, message, path_prefix) for _ in range(times))

    # -- request handling ------------------------------------------------------------------

    def handle(self, method: str, path: str, auth: str | None, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self.requests.append((method, path, json.dumps(body)))
            if auth != f"Bearer {self.api_key}":
                return _error(401, "global/invalid-api-key", "API key was invalid, expired, or deleted.")
            if not self.account_active:
                return _error(403, "global/account-inactive", "Your account is inactive.")
            for index, injected in enumerate(self.injected):
                if path.startswith("/api/v1" + injected.path_prefix):
                    del self.injected[index]
                    return _error(injected.status, injected.code, injected.message)
            route = self._route(method, path)
            if route is None:
                return _error(404, "global/object-does-not-exist", f"No route {method} {path}")
            return route(path.rsplit("/", 1)[-1], body)

    def _route(self, method: str, path: str) -> Callable[[str, dict[str, Any]], tuple[int, dict[str, Any]]] | None:
        routes = {
            ("GET", "/api/v1/instance-types"): self._instance_types,
            ("POST", "/api/v1/instance-operations/launch"): self._launch,
            ("POST", "/api/v1/instance-operations/terminate"): self._terminate,
            ("GET", "/api/v1/instances"): self._list_instances,
            ("GET", "/api/v1/file-systems"): self._list_file_systems,
            ("POST", "/api/v1/filesystems"): self._create_file_system,
            ("GET", "/api/v1/ssh-keys"): self._list_ssh_keys,
            ("POST", "/api/v1/ssh-keys"): self._add_ssh_key,
        }
        if (method, path) in routes:
            return routes[(method, path)]
        if method == "GET" and path.startswith("/api/v1/instances/"):
            return self._get_instance
        if method == "DELETE" and path.startswith("/api/v1/filesystems/"):
            return self._delete_file_system
        return None

    def _instance_types(self, _: str, __: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        data = {
            name: {
                "instance_type": {
                    "name": t.name,
                    "description": t.description,
                    "gpu_description": t.gpu_description,
                    "price_cents_per_hour": t.price_cents_per_hour,
                    "specs": t.specs,
                },
                "regions_with_capacity_available": [
                    {"name": r, "description": REGIONS.get(r, r)} for r in sorted(t.regions_with_capacity)
                ],
            }
            for name, t in self.types.items()
        }
        return 200, {"data": data}

    def _launch(self, _: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        now = time.monotonic()
        if self._last_launch is not None and now - self._last_launch < self.launch_interval:
            return _error(429, "global/too-many-requests", "Launch requests are limited to one every 12 seconds.")
        self._last_launch = now
        kind = self.types.get(body.get("instance_type_name", ""))
        region = body.get("region_name", "")
        if kind is None:
            return _error(400, "global/invalid-parameters", "Unknown instance type.")
        if len(body.get("ssh_key_names", [])) != 1:
            return _error(400, "global/invalid-parameters", "Exactly one SSH key must be specified.")
        if body["ssh_key_names"][0] not in {k["name"] for k in self.ssh_keys.values()}:
            return _error(404, "global/object-does-not-exist", "Specified SSH key does not exist.")
        for fs_name in body.get("file_system_names", []):
            fs = self._file_system_named(fs_name)
            if fs is None:
                return _error(404, "global/object-does-not-exist", f"File system {fs_name} does not exist.")
            if fs["region"]["name"] != region:
                return _error(
                    400,
                    "instance-operations/launch/file-system-in-wrong-region",
                    "File system is in a different region than the instance.",
                )
        if region not in kind.regions_with_capacity:
            return _error(
                400,
                "instance-operations/launch/insufficient-capacity",
                "Not enough capacity to fulfill launch request.",
            )
        if len(self.instances) >= self.quota:
            return _error(400, "global/quota-exceeded", "Quota exceeded: too many instances.")
        instance = {
            "id": uuid.uuid4().hex,
            "name": body.get("name"),
            "ip": None,
            "status": "booting",
            "ssh_key_names": body["ssh_key_names"],
            "file_system_names": body.get("file_system_names", []),
            "region": {"name": region, "description": REGIONS.get(region, region)},
            "instance_type": {
                "name": kind.name,
                "description": kind.description,
                "gpu_description": kind.gpu_description,
                "price_cents_per_hour": kind.price_cents_per_hour,
                "specs": kind.specs,
            },
            "hostname": None,
            "_created": now,
        }
        for fs_name in instance["file_system_names"]:
            fs = self._file_system_named(fs_name)
            assert fs is not None
            fs["is_in_use"] = True
        self.instances[instance["id"]] = instance
        if self.on_launch is not None:
            instance["ip"] = self.on_launch(_public(instance))
        return 200, {"data": {"instance_ids": [instance["id"]]}}

    def _refresh(self, instance: dict[str, Any]) -> dict[str, Any]:
        booted = time.monotonic() - instance["_created"] >= self.boot_seconds
        if instance["status"] == "booting" and not self.stuck_booting and booted:
            instance["status"] = "unhealthy" if self.unhealthy_after_boot else "active"
        return _public(instance)

    def _list_instances(self, _: str, __: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        return 200, {"data": [self._refresh(i) for i in self.instances.values()]}

    def _get_instance(self, instance_id: str, _: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if instance_id not in self.instances:
            return _error(404, "global/object-does-not-exist", "Specified instance does not exist.")
        return 200, {"data": self._refresh(self.instances[instance_id])}

    def _terminate(self, _: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        ids = body.get("instance_ids", [])
        missing = [i for i in ids if i not in self.instances]
        if missing:
            return _error(404, "global/object-does-not-exist", "Specified instance does not exist.")
        terminated = []
        for instance_id in ids:
            instance = self.instances.pop(instance_id)
            instance["status"] = "terminated"
            for fs_name in instance["file_system_names"]:
                fs = self._file_system_named(fs_name)
                if fs is not None and not any(fs_name in i["file_system_names"] for i in self.instances.values()):
                    fs["is_in_use"] = False
            if self.on_terminate is not None:
                self.on_terminate(_public(instance))
            terminated.append(_public(instance))
        return 200, {"data": {"terminated_instances": terminated}}

    def _file_system_named(self, name: str) -> dict[str, Any] | None:
        return next((fs for fs in self.file_systems.values() if fs["name"] == name), None)

    def _list_file_systems(self, _: str, __: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        return 200, {"data": [_public(fs) for fs in self.file_systems.values()]}

    def _create_file_system(self, _: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        name, region = body.get("name", ""), body.get("region", "")
        if region not in REGIONS:
            return _error(400, "global/invalid-parameters", "Unknown region.")
        if self._file_system_named(name) is not None:
            return _error(400, "global/invalid-parameters", "A file system with this name already exists.")
        directory = self.fs_root / name
        directory.mkdir(parents=True, exist_ok=True)
        fs = {
            "id": uuid.uuid4().hex,
            "name": name,
            "mount_point": f"/lambda/nfs/{name}",
            "region": {"name": region, "description": REGIONS[region]},
            "is_in_use": False,
            "bytes_used": 0,
            "_directory": str(directory),
        }
        self.file_systems[fs["id"]] = fs
        return 200, {"data": _public(fs)}

    def _delete_file_system(self, fs_id: str, _: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        fs = self.file_systems.get(fs_id)
        if fs is None:
            return _error(404, "global/object-does-not-exist", "Specified file system does not exist.")
        if fs["is_in_use"]:
            return _error(400, "filesystems/filesystem-in-use", "File system is in use by an instance.")
        del self.file_systems[fs_id]
        return 200, {"data": {"deleted_ids": [fs_id]}}

    def _list_ssh_keys(self, _: str, __: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        return 200, {"data": list(self.ssh_keys.values())}

    def _add_ssh_key(self, _: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if any(k["name"] == body.get("name") for k in self.ssh_keys.values()):
            return _error(400, "global/invalid-parameters", "An SSH key with this name already exists.")
        key = {"id": uuid.uuid4().hex, "name": body["name"], "public_key": body["public_key"]}
        self.ssh_keys[key["id"]] = key
        return 200, {"data": key}

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        emulator = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else {}
                except ValueError:
                    status, payload = _error(400, "global/invalid-parameters", "Body is not JSON.")
                else:
                    status, payload = emulator.handle(self.command, self.path, self.headers.get("Authorization"), body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _serve

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


def _public(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if not k.startswith("_")}


def _error(status: int, code: str, message: str, suggestion: str | None = None) -> tuple[int, dict[str, Any]]:
    return status, {"error": {"code": code, "message": message, "suggestion": suggestion}}
