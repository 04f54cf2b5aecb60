"""Provider-neutral records, errors and HTTP discipline shared by the cloud API clients.

Every cloud client (``providers/runpod/api.py``, ``providers/vast/api.py``) answers in these
records, so ``lenslab offers`` can put every provider's offers in one table sorted by $/GPU-hour
and a watcher can read any provider's instance state the same way:

- ``Offer``: what can be rented now, with on-demand and interruptible prices;
- ``Instance``: a rented machine, its state normalised to ``STATES``;
- ``CloudError`` and its subclasses: what a provider refused, one line each, never the API key;
- ``send``: one request with lenslab's retry rules (below); ``Shape``: checks a reply's shape
  where it enters, so a wrong reply is one ``CloudBadReply`` line, never a traceback.

Retry rules. Only what is transient is retried: HTTP 429 (honouring ``Retry-After``), 5xx,
timeouts and broken connections. A call that creates or spends (``create=True``) is retried
only when the request certainly did not reach the provider (connection refused, 429); after a
5xx, a timeout or a dropped reply it may have happened (RunPod has been seen creating a pod
and then answering 500), so ``CloudOutcomeUnknown`` is raised and the caller looks for what it
asked for by name before asking again.

Only httpx is imported: this module is on the path of ``lenslab offers``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from lenslab.errors import ProviderError
from lenslab.providers.lean_httpx import httpx

# Normalised instance states (``Instance.state``).
STARTING: Final = "starting"  # created or resuming, not yet reachable
RUNNING: Final = "running"  # up; ssh_host/ssh_port set once the provider reports them
STOPPED: Final = "stopped"  # stopped or paused by its owner; disk kept, resumable
PREEMPTED: Final = "preempted"  # taken back by the provider (spot exited, outbid); resumable where kept
TERMINATED: Final = "terminated"  # gone for good
UNKNOWN: Final = "unknown"  # a status this client does not know; shown, never acted on
STATES: Final = (STARTING, RUNNING, STOPPED, PREEMPTED, TERMINATED, UNKNOWN)

MAX_ATTEMPTS = 6
INITIAL_BACKOFF_SECONDS = 1.0
MAX_BACKOFF_SECONDS = 30.0
REQUEST_TIMEOUT_SECONDS = 30.0


@dataclass(frozen=True)
class Offer:
    provider: str  # "runpod", "vast"
    offer_id: str  # what the provider's launch call takes (RunPod GPU type id, vast.ai ask id)
    gpu_name: str  # the provider's display name, e.g. "A100 SXM 80GB", "RTX 4090"
    gpu_count: int  # GPUs in this offer
    vram_gb: float  # memory of one GPU, in GB
    region: str  # RunPod data center id, vast.ai geolocation; "" where the offer is not bound to one
    price_on_demand: float | None  # $/h for the whole offer; None where not rentable on demand
    price_interruptible: float | None  # $/h minimum bid for the whole offer; None where there is none
    available: bool  # the provider says it can be rented now
    persistent_storage: bool  # lenslab's persistent root can outlive an instance here

    @property
    def price_per_gpu_hour(self) -> float | None:
        """The on-demand $/GPU-hour, else the interruptible one: what ``lenslab offers`` sorts by."""
        price = self.price_on_demand if self.price_on_demand is not None else self.price_interruptible
        return None if price is None else price / max(self.gpu_count, 1)


def cheapest_first(offers: Iterable[Offer], *, interruptible: bool = False) -> list[Offer]:
    """Offers by $/GPU-hour (interruptible prices when asked), unpriced ones last."""

    def key(offer: Offer) -> tuple[bool, float, str, str]:
        price = offer.price_interruptible if interruptible else offer.price_per_gpu_hour
        if interruptible and price is not None:
            price /= max(offer.gpu_count, 1)
        return (price is None, price or 0.0, offer.provider, offer.gpu_name)

    return sorted(offers, key=key)


@dataclass(frozen=True)
class Instance:
    provider: str  # "runpod", "vast"
    id: str  # the provider's id for it
    name: str  # what lenslab named it (RunPod pod name, vast.ai label); how a lost create is found
    state: str  # one of STATES
    provider_status: str  # the provider's own words, for messages (e.g. "EXITED", "running/exited")
    interruptible: bool  # a spot pod / bid instance
    gpu_name: str  # "" where the provider does not say
    gpu_count: int
    price_per_hour: float | None  # what it costs while running, $/h; None where not reported
    ssh_host: str | None  # the public IP where the box's sshd answers, once running
    ssh_port: int | None  # the public port mapped to the container's sshd port
    created_at: float | None = None  # epoch seconds, where the provider reports it


class CloudError(ProviderError):
    """A cloud API refused or failed; ``code`` names the kind (``lenslab/...`` for lenslab's own)."""

    def __init__(self, message: str, fix: str | None = None, code: str = "") -> None:
        self.code = code
        super().__init__(message, fix)


class CloudKeyRefused(CloudError):
    pass


class CloudNoCapacity(CloudError):
    pass


class CloudOutOfFunds(CloudError):
    """Balance, credit or quota exhausted."""


class CloudNotFound(CloudError):
    pass


class CloudBadReply(CloudError):
    """A reply of the wrong shape: HTML, null, a list for an object, a missing field."""


class CloudUnreachable(CloudError):
    """No answer after every retry (network down, timeouts, a storm of 429s or 5xx)."""


class CloudOutcomeUnknown(CloudError):
    """A create whose reply was lost: it may have happened; find it by name before asking again."""


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = MAX_ATTEMPTS
    initial_backoff: float = INITIAL_BACKOFF_SECONDS
    max_backoff: float = MAX_BACKOFF_SECONDS


def bearer_client(api_key: str, transport: httpx.BaseTransport | None = None) -> httpx.Client:
    """An httpx client that sends the key only in the Authorization header (never a URL)."""
    return httpx.Client(
        headers={"Authorization": f"Bearer {api_key}", "Accept": "application/json"},
        timeout=REQUEST_TIMEOUT_SECONDS,
        transport=transport,
        follow_redirects=False,  # a redirect could carry the header somewhere else
    )


def send(
    http: httpx.Client,
    method: str,
    url: str,
    *,
    provider: str,
    endpoint: str,
    policy: RetryPolicy,
    sleep: Callable[[float], None] = time.sleep,
    create: bool = False,
    json: Any = None,
    params: Mapping[str, str] | None = None,
) -> httpx.Response:
    """One request under the retry rules above; returns any reply that is not transient."""
    backoff = policy.initial_backoff
    for attempt in range(1, policy.max_attempts + 1):
        last = attempt == policy.max_attempts
        try:
            response = http.request(method, url, json=json, params=params)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            # Nothing reached the provider: safe to try again, even for a create.
            if last:
                raise _unreachable(provider, endpoint, type(exc).__name__) from exc
        except httpx.TransportError as exc:
            if create:
                raise _outcome_unknown(provider, endpoint, type(exc).__name__) from exc
            if last:
                raise _unreachable(provider, endpoint, type(exc).__name__) from exc
        else:
            status = response.status_code
            if status != 429 and status < 500:
                return response
            if create and status >= 500:
                raise _outcome_unknown(provider, endpoint, f"HTTP {status}")
            if last:
                raise _unreachable(provider, endpoint, f"HTTP {status} after {attempt} attempts")
            wait = retry_after(response, policy.max_backoff)
            if wait is not None:
                sleep(wait)
                continue
        sleep(backoff)
        backoff = min(backoff * 2, policy.max_backoff)
    raise AssertionError("unreachable: the last attempt returns or raises")


def retry_after(response: httpx.Response, ceiling: float) -> float | None:
    """The reply's ``Retry-After`` in seconds (capped), or None when absent or a date."""
    value = response.headers.get("Retry-After")
    try:
        return max(0.0, min(float(value), ceiling)) if value else None
    except ValueError:
        return None


def _unreachable(provider: str, endpoint: str, why: str) -> CloudUnreachable:
    return CloudUnreachable(
        f"{provider} API {endpoint} did not answer ({why})",
        "check your network connection, or the provider's status page, and try again",
        code="lenslab/unreachable",
    )


def _outcome_unknown(provider: str, endpoint: str, why: str) -> CloudOutcomeUnknown:
    return CloudOutcomeUnknown(
        f"{provider} API {endpoint}: the reply was lost ({why}); it may or may not have happened",
        "lenslab looks for it by name before trying again; nothing was retried blindly",
        code="lenslab/outcome-unknown",
    )


class Shape:
    """Checks one reply's shape where it enters: each method returns the value or raises one
    ``CloudBadReply`` line naming the endpoint and the first thing that was wrong (the value's
    JSON type, never the value: it could be long or carry control characters)."""

    def __init__(self, provider: str, endpoint: str, fix: str) -> None:
        self.provider, self.endpoint, self.fix = provider, endpoint, fix

    def fail(self, where: str, what: str) -> CloudBadReply:
        return CloudBadReply(
            f"{self.provider} API {self.endpoint}: unexpected reply ({where}: {what})",
            self.fix,
            code="lenslab/unexpected-reply",
        )

    def json(self, response: httpx.Response) -> Any:
        try:
            return response.json()
        except ValueError:
            kind = response.headers.get("Content-Type", "no content type").split(";")[0]
            raise self.fail("body", f"not JSON ({kind}, HTTP {response.status_code})") from None

    def obj(self, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(where, f"expected an object, got {kind_of(value)}")
        return value

    def items(self, value: Any, where: str) -> list[Any]:
        if not isinstance(value, list):
            raise self.fail(where, f"expected a list, got {kind_of(value)}")
        return value

    def text(self, obj: Mapping[str, Any], key: str, where: str, *, optional: bool = False) -> str | None:
        value = self._get(obj, key, where, optional)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
            raise self.fail(f"{where}.{key}", f"expected a non-empty string, got {kind_of(value)}")
        return str(value)  # ids are numbers on vast.ai, strings on RunPod

    def number(self, obj: Mapping[str, Any], key: str, where: str, *, optional: bool = False) -> float | None:
        value = self._get(obj, key, where, optional)
        if value is None:
            return None
        # NaN passes `< 0` and would make every budget comparison False: refuse non-finite too.
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
            raise self.fail(f"{where}.{key}", f"expected a finite number >= 0, got {kind_of(value)}")
        return float(value)

    def whole(self, obj: Mapping[str, Any], key: str, where: str, *, optional: bool = False) -> int | None:
        value = self.number(obj, key, where, optional=optional)
        if value is not None and value != int(value):
            raise self.fail(f"{where}.{key}", "expected a whole number, got a fraction")
        return None if value is None else int(value)

    def flag(self, obj: Mapping[str, Any], key: str, where: str, *, optional: bool = False) -> bool | None:
        value = self._get(obj, key, where, optional)
        if value is not None and not isinstance(value, bool):
            raise self.fail(f"{where}.{key}", f"expected a boolean, got {kind_of(value)}")
        return value

    def _get(self, obj: Mapping[str, Any], key: str, where: str, optional: bool) -> Any:
        value = obj.get(key)
        if value is None and not optional:
            raise self.fail(f"{where}.{key}", "missing" if key not in obj else "expected a value, got null")
        return value


def kind_of(value: object) -> str:
    """A value's JSON type in words, never the value itself."""
    if value is None:
        return "null"
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)


def first_line(text: str, limit: int = 200) -> str:
    """A provider's message made safe for one line: no newlines or control characters, bounded."""
    clean = "".join(ch if ch.isprintable() else " " for ch in text).strip()
    return clean[:limit].rstrip(".") or "no message"
