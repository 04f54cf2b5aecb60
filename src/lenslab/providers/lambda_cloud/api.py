"""A small client of the Lambda Cloud API (``https://cloud.lambda.ai/api/v1``).

Endpoints used, as published: ``GET /instance-types``, ``POST /instance-operations/launch``,
``GET /instances``, ``GET /instances/{id}``, ``POST /instance-operations/terminate``,
``GET /file-systems``, ``POST /filesystems``, ``DELETE /filesystems/{id}``, ``GET /ssh-keys``,
``POST /ssh-keys``. Successful responses wrap their payload in ``{"data": ...}``; failures
are ``{"error": {"code", "message", "suggestion"}}``, mapped here to lenslab's errors. Every
reply's shape is checked here (``replies``), the one place replies enter lenslab.

Only what is transient is retried: HTTP 429 (honouring ``Retry-After``), 5xx, ``provider/*``
error codes and network failures. A call that spends or creates (launch, create a file system,
add a key) is not replay-safe: it is sent again only when Lambda certainly did not act on it
(429, or no connection was made). Any other failure of such a call raises ``OutcomeUnknown``
and the caller looks for what it asked for by name before asking again. Launches are spaced
by ``LAUNCH_MIN_INTERVAL_SECONDS``, Lambda's limit for that endpoint. The API key is sent only
in the ``Authorization`` header and appears in no message, ``repr`` or log.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from lenslab.errors import (
    AccountInactive,
    FileSystemInUse,
    FileSystemInWrongRegion,
    InsufficientCapacity,
    InvalidApiKey,
    LambdaError,
    ObjectDoesNotExist,
    OutcomeUnknown,
    QuotaExceeded,
    UnexpectedReply,
)
from lenslab.providers.lambda_cloud import replies
from lenslab.providers.lambda_cloud.replies import FileSystemReply, InstanceReply, InstanceTypeEntry, SSHKeyReply

__all__ = [  # the Lambda family lives in lenslab.errors; re-exported for callers of this module
    "AccountInactive",
    "FileSystemInUse",
    "FileSystemInWrongRegion",
    "InsufficientCapacity",
    "InvalidApiKey",
    "LambdaError",
    "ObjectDoesNotExist",
    "OutcomeUnknown",
    "QuotaExceeded",
    "UnexpectedReply",
]

API_BASE = "https://cloud.lambda.ai/api/v1"
MAX_ATTEMPTS = 6
INITIAL_BACKOFF_SECONDS = 1.0
MAX_BACKOFF_SECONDS = 30.0
LAUNCH_MIN_INTERVAL_SECONDS = 12.0
REQUEST_TIMEOUT_SECONDS = 30.0
# Failures after which the request certainly never reached Lambda, so sending it again is safe
# even for a launch.
NEVER_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.UnsupportedProtocol)

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
    price_cents_per_hour: int  # 0 when the reply did not say
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
        timeout: float = REQUEST_TIMEOUT_SECONDS,
    ) -> None:
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=timeout,
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

    def __enter__(self) -> LambdaClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- instance types, instances ---------------------------------------------------------

    def instance_types(self) -> dict[str, InstanceType]:
        data = self._call("GET", "/instance-types", dict[str, InstanceTypeEntry])
        return {name: _instance_type(entry) for name, entry in data.items()}

    def launch(
        self, region: str, instance_type: str, ssh_key_name: str, file_system_names: list[str], name: str
    ) -> str:
        """Launch one instance; returns its id. Spaced by Lambda's launch rate limit.

        Raises ``OutcomeUnknown`` when the launch may have happened without lenslab hearing of
        it: look for an instance named ``name`` before launching again."""
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
        endpoint = "POST /instance-operations/launch"
        try:
            data = self._call("POST", "/instance-operations/launch", replies.LaunchReply, body, replay_safe=False)
        except UnexpectedReply as exc:
            raise OutcomeUnknown(exc.message, exc.fix, code=exc.code) from exc
        finally:
            self._last_launch = self._clock()
        if len(data.instance_ids) != 1 or not data.instance_ids[0]:
            raise OutcomeUnknown(
                f"Lambda Cloud API {endpoint}: unexpected reply (data.instance_ids: "
                f"{len(data.instance_ids)} ids instead of one)",
                replies.FIX,
                code="lenslab/unexpected-reply",
            )
        instance_id: str = data.instance_ids[0]
        return instance_id

    def instances(self) -> list[Instance]:
        return [_instance(entry) for entry in self._call("GET", "/instances", list[InstanceReply])]

    def instance(self, instance_id: str) -> Instance:
        return _instance(self._call("GET", f"/instances/{instance_id}", InstanceReply))

    def terminate(self, instance_ids: list[str]) -> list[Instance]:
        """Replay-safe: a retry after a lost reply meets ``ObjectDoesNotExist``, which callers
        that only want the instance gone treat as done."""
        body = {"instance_ids": instance_ids}
        data = self._call("POST", "/instance-operations/terminate", replies.TerminateReply, body)
        return [_instance(entry) for entry in data.terminated_instances]

    # -- file systems, ssh keys ------------------------------------------------------------

    def file_systems(self) -> list[FileSystem]:
        return [_file_system(entry) for entry in self._call("GET", "/file-systems", list[FileSystemReply])]

    def create_file_system(self, name: str, region: str) -> FileSystem:
        body = {"name": name, "region": region}
        return _file_system(self._call("POST", "/filesystems", FileSystemReply, body, replay_safe=False))

    def delete_file_system(self, file_system_id: str) -> None:
        # The reply's content is not needed: HTTP 200 means deleted.
        self._request("DELETE", f"/filesystems/{file_system_id}")

    def ssh_keys(self) -> list[SSHKey]:
        return [SSHKey(k.id, k.name, k.public_key) for k in self._call("GET", "/ssh-keys", list[SSHKeyReply])]

    def add_ssh_key(self, name: str, public_key: str) -> SSHKey:
        body = {"name": name, "public_key": public_key}
        key = self._call("POST", "/ssh-keys", SSHKeyReply, body, replay_safe=False)
        return SSHKey(key.id, key.name, key.public_key)

    # -- transport -------------------------------------------------------------------------

    def _call(
        self, method: str, path: str, shape: Any, json: dict[str, Any] | None = None, *, replay_safe: bool = True
    ) -> Any:
        data = self._request(method, path, json, replay_safe=replay_safe)
        return replies.parse(f"{method} {path}", shape, data)

    def _request(self, method: str, path: str, json: dict[str, Any] | None = None, *, replay_safe: bool = True) -> Any:
        """The reply's ``data``; retries what is transient, and for a call that is not
        replay-safe only what Lambda certainly did not act on."""
        endpoint = f"{method} {path}"
        backoff = INITIAL_BACKOFF_SECONDS
        for attempt in range(1, MAX_ATTEMPTS + 1):
            last = attempt == MAX_ATTEMPTS
            try:
                response = self._http.request(method, path, json=json)
            except httpx.RequestError as exc:
                if not replay_safe and not isinstance(exc, NEVER_SENT):
                    raise _no_reply(endpoint, type(exc).__name__) from exc
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
                return _payload(endpoint, response)
            code, message, suggestion = _error_of(response)
            transient = response.status_code == 429 or response.status_code >= 500 or code.startswith("provider/")
            # A 429 is refused before anything happens; a 5xx may come after the work was done.
            if transient and not replay_safe and response.status_code != 429:
                raise _no_reply(endpoint, f"HTTP {response.status_code}")
            if transient and not last:
                self._sleep(_retry_after(response) or backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)
                continue
            raise _to_lenslab_error(endpoint, response.status_code, code, message, suggestion)
        raise AssertionError("unreachable: the last attempt returns or raises")


def _no_reply(endpoint: str, what: str) -> OutcomeUnknown:
    return OutcomeUnknown(
        f"Lambda Cloud API {endpoint}: no usable reply ({what})",
        "check your network connection and try again",
        code="lenslab/no-reply",
    )


def _payload(endpoint: str, response: httpx.Response) -> Any:
    """The ``data`` member of a successful reply, or ``UnexpectedReply`` naming what came instead."""
    try:
        body = response.json()
    except ValueError:
        kind = _clean(response.headers.get("content-type", "").split(";")[0], 40) or "no content type"
        raise UnexpectedReply(
            f"Lambda Cloud API {endpoint}: the reply is not JSON (HTTP {response.status_code}, {kind})",
            replies.FIX,
            code="lenslab/unexpected-reply",
        ) from None
    if not isinstance(body, dict) or "data" not in body:
        what = "an object without `data`" if isinstance(body, dict) else replies.kind_of(body)
        raise UnexpectedReply(
            f'Lambda Cloud API {endpoint}: unexpected reply ({what} instead of {{"data": ...}})',
            replies.FIX,
            code="lenslab/unexpected-reply",
        )
    return body["data"]


def _clean(text: object, limit: int = 200) -> str:
    """Text from the API fit for one line: no control characters, bounded length."""
    line = re.sub(r"[\x00-\x1f\x7f-\x9f\s]+", " ", str(text)).strip()
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _error_of(response: httpx.Response) -> tuple[str, str, str]:
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        error = None
    if not isinstance(error, dict):
        return "", _clean(response.reason_phrase), ""
    return _clean(error.get("code") or ""), _clean(error.get("message") or ""), _clean(error.get("suggestion") or "")


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    try:
        return min(float(value), MAX_BACKOFF_SECONDS) if value else None
    except ValueError:
        return None


def _to_lenslab_error(endpoint: str, status: int, code: str, message: str, suggestion: str) -> LambdaError:
    cls, advice = ERROR_CODES.get(code, (LambdaError, suggestion or "see https://docs.lambda.ai for the error code"))
    if not code:
        text = f"Lambda Cloud API {endpoint}: HTTP {status}" + (f" {message.rstrip('.')}" if message else "")
        return LambdaError(text, suggestion or replies.FIX)
    text = f"Lambda Cloud: {message.rstrip('.') or f'HTTP {status}'} ({code})"
    return cls(text, advice, code=code)


def _instance_type(entry: InstanceTypeEntry) -> InstanceType:
    info = entry.instance_type
    return InstanceType(
        name=info.name,
        description=info.description,
        gpu_description=info.gpu_description,
        price_cents_per_hour=info.price_cents_per_hour,
        regions_with_capacity=tuple(r.name for r in entry.regions_with_capacity_available),
        specs=dict(info.specs),
    )


def _instance(entry: InstanceReply) -> Instance:
    return Instance(
        id=entry.id,
        name=entry.name,
        status=entry.status,
        ip=entry.ip,
        region=entry.region.name if entry.region else "",
        instance_type=entry.instance_type.name if entry.instance_type else "",
        price_cents_per_hour=entry.instance_type.price_cents_per_hour if entry.instance_type else 0,
        file_system_names=tuple(entry.file_system_names),
        ssh_key_names=tuple(entry.ssh_key_names),
    )


def _file_system(entry: FileSystemReply) -> FileSystem:
    return FileSystem(
        id=entry.id,
        name=entry.name,
        region=entry.region.name,
        is_in_use=entry.is_in_use,
        mount_point=entry.mount_point or f"/lambda/nfs/{entry.name}",
        bytes_used=entry.bytes_used,
    )
