"""A small client of the Lambda Cloud API (``https://cloud.lambda.ai/api/v1``).

Endpoints used, as published: ``GET /instance-types``, ``POST /instance-operations/launch``,
``GET /instances``, ``GET /instances/{id}``, ``POST /instance-operations/terminate``,
``GET /file-systems``, ``POST /filesystems``, ``DELETE /filesystems/{id}``, ``GET /ssh-keys``,
``POST /ssh-keys``. Successful responses wrap their payload in ``{"data": ...}``; failures
are ``{"error": {"code", "message", "suggestion"}}``, mapped here to lenslab's errors.

Only what is transient is retried: HTTP 429 (honouring ``Retry-After``), 5xx, ``provider/*``
error codes and network timeouts. Launches are spaced by ``LAUNCH_MIN_INTERVAL_SECONDS``,
Lambda's limit for that endpoint. The API key is sent only in the ``Authorization`` header
and appears in no message, ``repr`` or log.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from lenslab.errors import ProviderError

API_BASE = "https://cloud.lambda.ai/api/v1"
MAX_ATTEMPTS = 6
INITIAL_BACKOFF_SECONDS = 1.0
MAX_BACKOFF_SECONDS = 30.0
LAUNCH_MIN_INTERVAL_SECONDS = 12.0
REQUEST_TIMEOUT_SECONDS = 30.0


class LambdaError(ProviderError):
    """An error the Lambda Cloud API returned; ``code`` is its error code."""

    def __init__(self, message: str, fix: str | None = None, code: str = "") -> None:
        self.code = code
        super().__init__(message, fix)


class InsufficientCapacity(LambdaError):
    pass


class FileSystemInWrongRegion(LambdaError):
    pass


class QuotaExceeded(LambdaError):
    pass


class InvalidApiKey(LambdaError):
    pass


class AccountInactive(LambdaError):
    pass


class ObjectDoesNotExist(LambdaError):
    pass


class FileSystemInUse(LambdaError):
    pass


# code -> (class, what lenslab advises); the API's own message is shown before the advice.
ERROR_CODES: dict[str, tuple[type[LambdaError], str]] = {
    "instance-operations/launch/insufficient-capacity": (
        InsufficientCapacity,
        "try another GPU type or region in lenslab.toml (box.gpu_types, box.regions), or retry later",
    ),
    "instance-operations/launch/file-system-in-wrong-region": (
        FileSystemInWrongRegion,
        "launch in the file system's region, or remove the file system there with `lenslab down --purge`",
    ),
    "global/quota-exceeded": (
        QuotaExceeded,
        "terminate an instance you no longer need (`lenslab down`), or ask Lambda to raise your quota",
    ),
    "global/invalid-api-key": (
        InvalidApiKey,
        "set LAMBDA_API_KEY (or the key file) to a valid key from https://cloud.lambda.ai/api-keys",
    ),
    "global/account-inactive": (
        AccountInactive,
        "activate your Lambda account (billing details) in the Lambda Cloud dashboard",
    ),
    "global/object-does-not-exist": (ObjectDoesNotExist, "it may have been removed already"),
    "filesystems/filesystem-in-use": (
        FileSystemInUse,
        "terminate the instance that uses it first (`lenslab down`), then try again",
    ),
}


@dataclass(frozen=True)
class InstanceType:
    name: str  # e.g. "gpu_1x_a100_sxm4"
    description: str  # e.g. "1x A100 (40 GB SXM4)"
    gpu_description: str
    price_cents_per_hour: int
    regions_with_capacity: tuple[str, ...]
    specs: dict[str, Any] = field(default_factory=dict)  # vcpus, memory_gib, storage_gib, gpus


@dataclass(frozen=True)
class Instance:
    id: str
    name: str | None
    status: str  # booting | active | unhealthy | terminating | terminated | preempted
    ip: str | None
    region: str
    instance_type: str
    price_cents_per_hour: int
    file_system_names: tuple[str, ...]
    ssh_key_names: tuple[str, ...]


@dataclass(frozen=True)
class FileSystem:
    id: str
    name: str
    region: str
    is_in_use: bool
    mount_point: str  # where instances mount it, e.g. /lambda/nfs/<name>
    bytes_used: int | None


@dataclass(frozen=True)
class SSHKey:
    id: str
    name: str
    public_key: str


class LambdaClient:
    def __init__(
        self,
        api_key: str,
        base_url: str = API_BASE,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=REQUEST_TIMEOUT_SECONDS,
            transport=transport,
        )
        self._sleep = sleep
        self._clock = clock
        self._last_launch: float | None = None
        self.base_url = base_url

    def __repr__(self) -> str:
        return f"LambdaClient({self.base_url!r})"

    def close(self) -> None:
        self._http.close()

    # -- instance types, instances ---------------------------------------------------------

    def instance_types(self) -> dict[str, InstanceType]:
        data = self._request("GET", "/instance-types")
        return {name: _instance_type(entry) for name, entry in data.items()}

    def launch(
        self, region: str, instance_type: str, ssh_key_name: str, file_system_names: list[str], name: str
    ) -> str:
        """Launch one instance; returns its id. Spaced by Lambda's launch rate limit."""
        if self._last_launch is not None:
            wait = LAUNCH_MIN_INTERVAL_SECONDS - (self._clock() - self._last_launch)
            if wait > 0:
                self._sleep(wait)
        body = {
            "region_name": region,
            "instance_type_name": instance_type,
            "ssh_key_names": [ssh_key_name],
            "file_system_names": file_system_names,
            "name": name,
            "quantity": 1,
        }
        try:
            data = self._request("POST", "/instance-operations/launch", json=body)
        finally:
            self._last_launch = self._clock()
        ids = data.get("instance_ids", [])
        if len(ids) != 1:
            raise LambdaError(f"Lambda Cloud launched {len(ids)} instances instead of one", code="lenslab/unexpected")
        return str(ids[0])

    def instances(self) -> list[Instance]:
        return [_instance(entry) for entry in self._request("GET", "/instances")]

    def instance(self, instance_id: str) -> Instance:
        return _instance(self._request("GET", f"/instances/{instance_id}"))

    def terminate(self, instance_ids: list[str]) -> list[Instance]:
        data = self._request("POST", "/instance-operations/terminate", json={"instance_ids": instance_ids})
        return [_instance(entry) for entry in data.get("terminated_instances", [])]

    # -- file systems, ssh keys ------------------------------------------------------------

    def file_systems(self) -> list[FileSystem]:
        return [_file_system(entry) for entry in self._request("GET", "/file-systems")]

    def create_file_system(self, name: str, region: str) -> FileSystem:
        data = self._request("POST", "/filesystems", json={"name": name, "region": region})
        return _file_system(data)

    def delete_file_system(self, file_system_id: str) -> None:
        self._request("DELETE", f"/filesystems/{file_system_id}")

    def ssh_keys(self) -> list[SSHKey]:
        return [SSHKey(str(k["id"]), k["name"], k["public_key"]) for k in self._request("GET", "/ssh-keys")]

    def add_ssh_key(self, name: str, public_key: str) -> SSHKey:
        data = self._request("POST", "/ssh-keys", json={"name": name, "public_key": public_key})
        return SSHKey(str(data["id"]), data["name"], data["public_key"])

    # -- transport -------------------------------------------------------------------------

    def _request(self, method: str, path: str, json: dict[str, Any] | None = None) -> Any:
        backoff = INITIAL_BACKOFF_SECONDS
        for attempt in range(1, MAX_ATTEMPTS + 1):
            last = attempt == MAX_ATTEMPTS
            try:
                response = self._http.request(method, path, json=json)
            except (httpx.TimeoutException, httpx.NetworkError) as exc:
                if last:
                    raise LambdaError(
                        f"Lambda Cloud API did not answer ({type(exc).__name__})",
                        "check your network connection and try again",
                        code="lenslab/unreachable",
                    ) from exc
                self._sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)
                continue
            if response.status_code < 400:
                return response.json().get("data")
            error = _error_of(response)
            transient = response.status_code == 429 or response.status_code >= 500 or error[0].startswith("provider/")
            if transient and not last:
                self._sleep(_retry_after(response) or backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)
                continue
            raise _to_lenslab_error(response.status_code, *error)
        raise AssertionError("unreachable: the last attempt returns or raises")


def _error_of(response: httpx.Response) -> tuple[str, str, str]:
    try:
        error = response.json().get("error", {})
        return str(error.get("code", "")), str(error.get("message", "")), str(error.get("suggestion") or "")
    except ValueError:
        return "", response.reason_phrase, ""


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    try:
        return min(float(value), MAX_BACKOFF_SECONDS) if value else None
    except ValueError:
        return None


def _to_lenslab_error(status: int, code: str, message: str, suggestion: str) -> LambdaError:
    cls, advice = ERROR_CODES.get(code, (LambdaError, suggestion or "see https://docs.lambda.ai for the error code"))
    text = f"Lambda Cloud: {message.rstrip('.') or f'HTTP {status}'}" + (f" ({code})" if code else "")
    return cls(text, advice, code=code)


def _instance_type(entry: dict[str, Any]) -> InstanceType:
    info = entry["instance_type"]
    return InstanceType(
        name=info["name"],
        description=info.get("description", ""),
        gpu_description=info.get("gpu_description", ""),
        price_cents_per_hour=int(info["price_cents_per_hour"]),
        regions_with_capacity=tuple(r["name"] for r in entry.get("regions_with_capacity_available", [])),
        specs=dict(info.get("specs", {})),
    )


def _instance(entry: dict[str, Any]) -> Instance:
    kind = entry.get("instance_type", {})
    return Instance(
        id=str(entry["id"]),
        name=entry.get("name"),
        status=entry["status"],
        ip=entry.get("ip"),
        region=entry.get("region", {}).get("name", ""),
        instance_type=kind.get("name", ""),
        price_cents_per_hour=int(kind.get("price_cents_per_hour", 0)),
        file_system_names=tuple(entry.get("file_system_names", [])),
        ssh_key_names=tuple(entry.get("ssh_key_names", [])),
    )


def _file_system(entry: dict[str, Any]) -> FileSystem:
    return FileSystem(
        id=str(entry["id"]),
        name=entry["name"],
        region=entry.get("region", {}).get("name", ""),
        is_in_use=bool(entry.get("is_in_use", False)),
        mount_point=entry.get("mount_point", f"/lambda/nfs/{entry['name']}"),
        bytes_used=entry.get("bytes_used"),
    )
