"""A stateful emulator of vast.ai's REST API (``/api/v0``), for tests and benchmarks: no cloud
is reachable.

It follows what vast-ai/vast-python's ``vast.py`` sends and reads: offers from ``POST
/bundles/`` (the query as JSON body, ``{"offers": [...]}``, ``gpu_ram`` in MB), rentals with
``PUT /asks/{id}/`` (``{"success": true, "new_contract": id}``; ``price`` set = interruptible
bid), ``GET /instances?owner=me``, ``GET /instances/{id}/``, ``PUT /instances/{id}/`` with a
``state``, ``DELETE /instances/{id}/``, ``PUT /instances/bid_price/{id}/`` and ``POST /ssh/``.
Failures are ``{"success": false, "error": <token>, "msg": <sentence>}`` with a 4xx. vast.py
reads only ``success`` and ``msg``; the tokens here (``no_such_ask``, ``insufficient_credit``,
``invalid_api_key``, ``no_such_instance``) are not published, so the client maps by HTTP status
and words and must not depend on the exact token.

State: asks (offers) that are taken while rented, instances with a lifecycle (``loading`` →
``running``; stopped; destroyed), an account credit. Nothing outlives a destroyed instance.
Faults: a wrong key, a taken ask (no capacity), no credit, 429 storms, latency and bad replies
(``HttpEmulator``), instances stuck loading, a lost reply after a create
(``drop_create_replies``), and ``preempt(id)``: an interruptible instance is outbid (its
container exits; ``intended_status`` stays running until its owner stops it).
Port mappings are asked for as vast.py sends them (``env`` keys ``"-p 2222:2222"``); the
instance then shows ``public_ipaddr`` and ``ports: {"2222/tcp": [{"HostIp", "HostPort"}]}``
(without one, vast.ai's own sshd: ``22/tcp`` and ``ssh_host``/``ssh_port``). Instances are real
containers when ``runner`` (``InstanceRunner``) is set: the image with ``args`` as its command
(runtype "args"), the variables of ``env``, a directory of the instance's own at /lab (deleted
with it: nothing outlives an instance here) and the mapped port published. Without a runner the
hooks decide: ``on_launch(instance) -> (ssh_host, ssh_port) | None`` when its container starts,
``on_stop(instance)`` when it stops or is outbid, ``on_terminate(instance)`` when destroyed.
"""

from __future__ import annotations

import itertools
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.http_emulator import DROP, HttpEmulator, Reply
from tests.support.instance_runner import InstanceRunner, Launch


@dataclass
class EmulatedAsk:
    id: int
    gpu_name: str
    num_gpus: int
    gpu_ram: int  # MB, as vast.ai reports it
    geolocation: str
    dph_total: float  # on-demand $/h for the whole offer
    min_bid: float  # lowest interruptible bid, $/h
    reliability: float = 0.99
    rented: bool = False

    def row(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "ask_contract_id": self.id,
            "gpu_name": self.gpu_name,
            "num_gpus": self.num_gpus,
            "gpu_ram": self.gpu_ram,
            "geolocation": self.geolocation,
            "dph_total": self.dph_total,
            "min_bid": self.min_bid,
            "reliability": self.reliability,
            "rentable": not self.rented,
            "verified": True,
            "external": False,
            "rented": self.rented,
        }


def default_asks() -> list[EmulatedAsk]:
    return [
        EmulatedAsk(5001, "RTX 4090", 1, 24564, "Texas, US", 0.42, 0.18),
        EmulatedAsk(5002, "A100 SXM4", 1, 81920, "Sweden, SE", 1.25, 0.61),
        EmulatedAsk(5003, "A100 SXM4", 2, 81920, "Quebec, CA", 2.36, 1.10),
        EmulatedAsk(5004, "H100 SXM", 1, 81559, "Oregon, US", 2.10, 1.30),
    ]


OPS = {"eq": lambda a, b: a == b, "gte": lambda a, b: a >= b, "lte": lambda a, b: a <= b}
Hook = Callable[[dict[str, Any]], Any]


class VastEmulator(HttpEmulator):
    def __init__(self, api_key: str = "vast-test-key-0123456789abcdef", disk_root: Path | None = None) -> None:
        super().__init__(api_key)
        self.disk_root = disk_root  # where instances' disks (host directories) live, with a runner
        self.runner: InstanceRunner | None = None
        self.asks = {a.id: a for a in default_asks()}
        self.instances: dict[int, dict[str, Any]] = {}
        self.created: list[int] = []  # every instance ever created, in order
        self.ssh_keys: list[str] = []
        self.credit = 50.0  # $; a rental needs at least an hour of its price
        self.boot_seconds = 0.0
        self.stuck_starting = False  # containers never leave "loading"
        self.drop_create_replies = 0  # the next N rentals happen, and their replies are lost
        self.on_launch: Hook | None = None
        self.on_stop: Hook | None = None
        self.on_terminate: Hook | None = None
        self._ids = itertools.count(900001)
        self._ports = itertools.count(41022)

    @property
    def url(self) -> str:
        return self.origin + "/api/v0"

    def preempt(self, instance_id: int | str) -> None:
        """An interruptible instance is outbid: its container exits, its owner's intent stays."""
        with self._lock:
            row = self.instances[int(instance_id)]
            assert row["is_bid"], "only interruptible instances are outbid"
            row.update(actual_status="exited", cur_state="stopped", status_msg="outbid", ports={})
            if self.runner is not None:
                self.runner.stop(str(row["id"]))
            if self.on_stop is not None:
                self.on_stop(_public(row))

    # -- dispatch ----------------------------------------------------------------------------

    def handle(self, method: str, path: str, query: dict[str, str], auth: str, body: Any) -> Reply:
        if not self.authorized(auth):
            return _fail(401, "invalid_api_key", "Invalid user key.")
        route = path.removeprefix("/api/v0")
        parts = [p for p in route.split("/") if p]
        if method == "POST" and parts == ["bundles"]:
            return self._search(body if isinstance(body, dict) else {})
        if method == "PUT" and len(parts) == 2 and parts[0] == "asks":
            return self._create(parts[1], body if isinstance(body, dict) else {})
        if method == "GET" and parts == ["instances"]:
            return Reply(200, {"instances": [self._view(r) for r in self.instances.values()]})
        if method == "POST" and parts == ["ssh"]:
            self.ssh_keys.append(str((body or {}).get("ssh_key", "")))
            return Reply(200, {"success": True})
        if len(parts) == 3 and parts[:2] == ["instances", "bid_price"] and method == "PUT":
            return self._with_instance(parts[2], lambda row: self._change_bid(row, body or {}))
        if len(parts) == 2 and parts[0] == "instances":
            actions: dict[str, Callable[[dict[str, Any]], Reply]] = {
                "GET": lambda row: Reply(200, {"instances": self._view(row)}),
                "PUT": lambda row: self._set_state(row, body or {}),
                "DELETE": self._destroy,
            }
            if method in actions:
                return self._with_instance(parts[1], actions[method])
        return _fail(404, "not_found", f"No route {method} {path}.")

    def _with_instance(self, raw_id: str, action: Callable[[dict[str, Any]], Reply]) -> Reply:
        row = self.instances.get(int(raw_id)) if raw_id.isdigit() else None
        if row is None:
            return _fail(404, "no_such_instance", f"Instance {raw_id} not found.")
        return action(row)

    # -- offers and rentals ----------------------------------------------------------------------

    def _search(self, query: dict[str, Any]) -> Reply:
        rows = [a.row() for a in self.asks.values()]
        for name, condition in query.items():
            if isinstance(condition, dict) and rows and name in rows[0]:
                for op, value in condition.items():
                    rows = [r for r in rows if op in OPS and OPS[op](r[name], value)]
        for field_name, direction in reversed(query.get("order") or []):
            rows.sort(key=lambda r: r[field_name], reverse=direction == "desc")
        return Reply(200, {"offers": rows[: int(query.get("limit") or len(rows))]})

    def _create(self, raw_id: str, body: dict[str, Any]) -> Reply:
        ask = self.asks.get(int(raw_id)) if raw_id.isdigit() else None
        if ask is None or ask.rented:
            return _fail(404, "no_such_ask", f"Instance type {raw_id} is no longer available.")
        bid = body.get("price")
        if bid is not None and float(bid) < ask.min_bid:
            return _fail(400, "invalid_args", f"Bid price must be at least {ask.min_bid}.")
        price = float(bid) if bid is not None else ask.dph_total
        if self.credit < price:
            return _fail(402, "insufficient_credit", "Your account lacks credit; add credit to rent instances.")
        ask.rented = True
        row = {
            "id": next(self._ids),
            "label": body.get("label") or "",
            "image_uuid": body.get("image", ""),
            "actual_status": "loading",
            "intended_status": "running",
            "cur_state": "running",
            "status_msg": "",
            "is_bid": bid is not None,
            "dph_total": price,
            "gpu_name": ask.gpu_name,
            "num_gpus": ask.num_gpus,
            "gpu_ram": ask.gpu_ram,
            "geolocation": ask.geolocation,
            "machine_id": ask.id * 10,
            "ssh_host": None,
            "ssh_port": None,
            "start_date": time.time(),
            "extra_env": [[k, v] for k, v in (body.get("env") or {}).items()],
            "_ask": ask.id,
            "_body": body,
        }
        self.instances[row["id"]] = row
        self.created.append(row["id"])
        self._boot(row)
        if self.drop_create_replies > 0:
            self.drop_create_replies -= 1
            return DROP
        return Reply(200, {"success": True, "new_contract": row["id"]})

    def _boot(self, row: dict[str, Any]) -> None:
        row["_started"] = time.monotonic()
        env = row["_body"].get("env") or {}
        mapped = [k.split(":")[-1].split("/")[0] for k in env if k.startswith("-p ")]
        row["_private_port"] = int(mapped[0]) if mapped else 22
        endpoint = self.on_launch(_public(row)) if self.on_launch is not None else None
        if self.runner is not None and not self.stuck_starting:
            endpoint = self.runner.start(self._launch(row))
        row["_ssh"] = endpoint or ("127.0.0.1", next(self._ports))

    def _launch(self, row: dict[str, Any]) -> Launch:
        body = row["_body"]
        assert self.disk_root is not None, "instances run as containers need a disk_root"
        args = body.get("args") if body.get("runtype") == "args" else None
        return Launch(
            key=str(row["id"]),
            image=str(body.get("image") or ""),
            command=tuple(str(a) for a in args or ()),
            env={str(k): str(v) for k, v in (body.get("env") or {}).items() if not str(k).startswith("-")},
            volume=self.disk_root / str(row["id"]),
            port=row["_private_port"],
        )

    def _view(self, row: dict[str, Any]) -> dict[str, Any]:
        booted = time.monotonic() - row["_started"] >= self.boot_seconds
        if row["actual_status"] == "loading" and booted and not self.stuck_starting:
            host, port = row["_ssh"]
            row["actual_status"] = "running"
            row["public_ipaddr"] = host
            row["ports"] = {f"{row['_private_port']}/tcp": [{"HostIp": "0.0.0.0", "HostPort": str(port)}]}
            if row["_private_port"] == 22:
                row["ssh_host"], row["ssh_port"] = host, port
        return _public(row)

    def _set_state(self, row: dict[str, Any], body: dict[str, Any]) -> Reply:
        state = body.get("state")
        if state == "stopped":
            row.update(intended_status="stopped", actual_status="exited", cur_state="stopped")
            row.update(ssh_host=None, ssh_port=None, ports={})
            if self.runner is not None:
                self.runner.stop(str(row["id"]))
            if self.on_stop is not None:
                self.on_stop(_public(row))
        elif state == "running":
            if row["actual_status"] != "running":
                row.update(intended_status="running", actual_status="loading", cur_state="running", status_msg="")
                self._boot(row)
        else:
            return _fail(400, "invalid_args", "state must be 'running' or 'stopped'.")
        return Reply(200, {"success": True})

    def _change_bid(self, row: dict[str, Any], body: dict[str, Any]) -> Reply:
        price = body.get("price")
        ask = self.asks[row["_ask"]]
        if not isinstance(price, (int, float)) or price < ask.min_bid:
            return _fail(400, "invalid_args", f"Bid price must be at least {ask.min_bid}.")
        row["dph_total"] = float(price)
        if row["status_msg"] == "outbid" and row["intended_status"] == "running":
            row.update(actual_status="loading", cur_state="running", status_msg="")
            self._boot(row)  # the bid leads again: vast.ai starts the container again
        return Reply(200, {"success": True})

    def _destroy(self, row: dict[str, Any]) -> Reply:
        del self.instances[row["id"]]
        self.asks[row["_ask"]].rented = False
        if self.runner is not None:
            self.runner.remove(str(row["id"]))
        if self.disk_root is not None:
            shutil.rmtree(self.disk_root / str(row["id"]), ignore_errors=True)  # its disk dies with it
        if self.on_terminate is not None:
            self.on_terminate(_public(row))
        return Reply(200, {"success": True})


def _fail(status: int, error: str, msg: str) -> Reply:
    return Reply(status, {"success": False, "error": error, "msg": msg})


def _public(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if not k.startswith("_")}
