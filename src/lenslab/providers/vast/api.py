"""A small client of vast.ai's REST API (``https://console.vast.ai/api/v0``).

Sources read (official): vast-ai/vast-python ``vast.py`` — ``search__offers`` (``POST /bundles/``
with the query as the JSON body, ``"type": "on-demand" | "bid"``, reply ``{"offers": [...]}``;
the older ``GET /bundles?q=`` is commented out there, so the POST is what is current; offer
fields ``id gpu_name num_gpus gpu_ram`` (MB: ``offers_mult`` scales GB by 1000) ``geolocation
dph_total min_bid rentable reliability``), ``create__instance`` (``PUT /asks/{id}/`` with
``client_id: "me"``, ``image``, ``disk``, ``label``, ``onstart``, ``runtype``, ``env``, ``price``
= the bid that makes it interruptible; reply ``{"success": true, "new_contract": id}``),
``show__instances`` / ``show__instance`` (``GET /instances?owner=me`` → ``{"instances": [...]}``,
``GET /instances/{id}/?owner=me`` → ``{"instances": {...}}``; ``actual_status``,
``intended_status``, ``cur_state``, ``is_bid``, ``ssh_host``, ``ssh_port``, ``label``),
``start_instance`` / ``stop_instance`` (``PUT /instances/{id}/`` ``{"state": ...}``),
``destroy_instance`` (``DELETE /instances/{id}/``), ``change__bid`` (``PUT
/instances/bid_price/{id}/``), ``create__ssh_key`` (``POST /ssh/``); failures are
``{"success": false, "error", "msg"}``, with a 4xx or even with HTTP 200. The ``error`` tokens
are not published, so failures are mapped by HTTP status (401/403, 402, 404) and by words in
``error``/``msg`` (``MESSAGES``), never by one exact token.

vast.py puts the key in the URL (``?api_key=``) as well as the header; lenslab sends it only
in ``Authorization: Bearer`` so it appears in no URL, log, message or ``repr``.

Retries and lost replies follow ``lenslab.providers.offers.send``: ``PUT /asks/{id}/`` is never
retried once it may have reached vast.ai; ``find_instances(label)`` finds what it made.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from lenslab.providers.lean_httpx import httpx
from lenslab.providers.offers import (
    CloudError,
    CloudKeyRefused,
    CloudNoCapacity,
    CloudNotFound,
    CloudOutOfFunds,
    Instance,
    Offer,
    RetryPolicy,
    Shape,
    bearer_client,
    first_line,
    send,
)
from lenslab.providers.vast import records
from lenslab.providers.vast.records import FIX, PROVIDER, InstanceSpec, VastInstance, VastOffer

API_BASE = "https://console.vast.ai/api/v0"
# The default filters of ``vastai search offers``: verified, rentable, not already rented.
BASE_QUERY: dict[str, Any] = {
    "verified": {"eq": True},
    "external": {"eq": False},
    "rentable": {"eq": True},
    "rented": {"eq": False},
}
MAX_OFFERS = 64

KEY_FIX = "set VAST_API_KEY (or the key file) to a valid key from https://cloud.vast.ai/account/"
# Words in vast.ai's ``error``/``msg`` -> (class, code, advice).
MESSAGES: tuple[tuple[tuple[str, ...], type[CloudError], str, str], ...] = (
    (("credit", "balance", "insufficient", "funds"), CloudOutOfFunds, "vast/out-of-funds",
     "add credit to your vast.ai account (Billing), then try again"),
    (("no_such_ask", "not available", "no longer available", "unavailable", "already rented"), CloudNoCapacity,
     "vast/no-capacity", "pick another offer (`lenslab offers`), or retry later"),
    (("invalid_api_key", "api key", "unauthorized", "not authenticated"), CloudKeyRefused, "vast/invalid-key",
     KEY_FIX),
    (("no_such_instance", "not found", "does not exist"), CloudNotFound, "vast/not-found",
     "it may have been removed already"),
)  # fmt: skip


class VastClient:
    def __init__(
        self,
        api_key: str,
        base_url: str = API_BASE,
        *,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        policy: RetryPolicy | None = None,
    ) -> None:
        self._http = bearer_client(api_key, transport)
        self._sleep = sleep
        self._policy = policy or RetryPolicy()
        self.base_url = base_url.rstrip("/")

    def __repr__(self) -> str:
        return f"VastClient({self.base_url!r})"

    def close(self) -> None:
        self._http.close()

    # -- offers ------------------------------------------------------------------------------

    def search(
        self,
        *,
        interruptible: bool = False,
        gpu_name: str | None = None,
        min_vram_gb: float | None = None,
        gpu_count: int | None = None,
        limit: int = MAX_OFFERS,
    ) -> list[VastOffer]:
        """Rentable offers, cheapest first (``dph_total``; ``min_bid`` for interruptible ones)."""
        query: dict[str, Any] = dict(BASE_QUERY)
        if gpu_name is not None:
            query["gpu_name"] = {"eq": gpu_name}
        if min_vram_gb is not None:
            query["gpu_ram"] = {"gte": min_vram_gb * 1000}  # vast.ai counts GPU memory in MB
        if gpu_count is not None:
            query["num_gpus"] = {"eq": gpu_count}
        query["order"] = [["min_bid" if interruptible else "dph_total", "asc"]]
        query["type"] = "bid" if interruptible else "on-demand"
        query["limit"] = limit
        body, shape = self._call("POST", "/bundles/", "POST /bundles/", query)
        offers = shape.items(shape.obj(body, "body").get("offers"), "body.offers")
        return [records.offer(shape, o, f"body.offers[{i}]") for i, o in enumerate(offers)]

    def offers(self, **filters: Any) -> list[Offer]:
        return [o.offer() for o in self.search(**filters)]

    # -- instances ---------------------------------------------------------------------------

    def create_instance(self, offer_id: str, spec: InstanceSpec, bid_price: float | None = None) -> str:
        """Rent offer ``offer_id``; interruptible when ``bid_price`` ($/h) is given. Returns the
        new instance's id. Never retried once it may have reached vast.ai."""
        body, shape = self._call("PUT", f"/asks/{offer_id}/", "PUT /asks/{id}/", spec.payload(bid_price), create=True)
        return shape.text(shape.obj(body, "body"), "new_contract", "body") or ""

    def instances(self) -> list[VastInstance]:
        body, shape = self._call("GET", "/instances", "GET /instances", params={"owner": "me"})
        rows = shape.items(shape.obj(body, "body").get("instances"), "body.instances")
        return [records.instance(shape, r, f"body.instances[{i}]") for i, r in enumerate(rows)]

    def instance(self, instance_id: str) -> VastInstance | None:
        """The instance, or None once it is gone."""
        try:
            body, shape = self._call(
                "GET", f"/instances/{instance_id}/", "GET /instances/{id}/", params={"owner": "me"}
            )
        except CloudNotFound:
            return None
        row = shape.obj(body, "body").get("instances")
        return None if row is None else records.instance(shape, row, "body.instances")

    def find_instances(self, label: str) -> list[VastInstance]:
        """Instances labelled ``label``: how a create whose reply was lost is found."""
        return [i for i in self.instances() if i.label == label]

    def normalised(self) -> list[Instance]:
        return [i.normalised() for i in self.instances()]

    def stop(self, instance_id: str) -> None:
        self._call("PUT", f"/instances/{instance_id}/", "PUT /instances/{id}/", {"state": "stopped"})

    def start(self, instance_id: str) -> None:
        """Start a stopped instance again (on its machine, when it has room)."""
        self._call("PUT", f"/instances/{instance_id}/", "PUT /instances/{id}/", {"state": "running"})

    def change_bid(self, instance_id: str, price: float) -> None:
        """Bid ``price`` $/h for an interruptible instance (an outbid one runs again once it leads)."""
        body = {"client_id": "me", "price": price}
        self._call("PUT", f"/instances/bid_price/{instance_id}/", "PUT /instances/bid_price/{id}/", body)

    def destroy(self, instance_id: str) -> None:
        """Destroy the instance and its disk; one that is already gone counts as destroyed."""
        try:
            self._call("DELETE", f"/instances/{instance_id}/", "DELETE /instances/{id}/", {})
        except CloudNotFound:
            return

    def add_ssh_key(self, public_key: str) -> None:
        """Add a public key to the account; vast.ai puts account keys into new instances."""
        self._call("POST", "/ssh/", "POST /ssh/", {"ssh_key": public_key})

    # -- transport ---------------------------------------------------------------------------

    def _call(
        self,
        method: str,
        path: str,
        endpoint: str,
        payload: dict[str, Any] | None = None,
        *,
        params: dict[str, str] | None = None,
        create: bool = False,
    ) -> tuple[Any, Shape]:
        """The JSON body of one call with failures mapped; the Shape names the endpoint."""
        shape = Shape(PROVIDER, endpoint, FIX)
        response = send(
            self._http,
            method,
            self.base_url + path,
            provider=PROVIDER,
            endpoint=endpoint,
            policy=self._policy,
            sleep=self._sleep,
            create=create,
            json=payload,
            params=params,
        )
        if response.status_code in (401, 403):
            raise CloudKeyRefused(
                f"vast.ai refused the API key (HTTP {response.status_code})", KEY_FIX, code="vast/invalid-key"
            )
        if response.status_code >= 400:
            raise _error(response, endpoint)
        body = shape.json(response)
        if isinstance(body, dict) and body.get("success") is False:
            raise _error(response, endpoint)
        return body, shape


def _error(response: httpx.Response, endpoint: str) -> CloudError:
    """One line from ``{"success": false, "error", "msg"}`` (or whatever came instead)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    token, message = "", ""
    if isinstance(body, dict):
        token = body["error"] if isinstance(body.get("error"), str) else ""
        message = body["msg"] if isinstance(body.get("msg"), str) else ""
    text = first_line(message or token) if (message or token) else f"HTTP {response.status_code}"
    line = f"vast.ai {endpoint}: {text}" + (f" ({first_line(token, 60)})" if token and message else "")
    words = f"{token} {message}".lower()
    for keys, cls, code, advice in MESSAGES:
        if any(k in words for k in keys):
            return cls(line, advice, code=code)
    if response.status_code == 402:
        return CloudOutOfFunds(line, MESSAGES[0][3], code="vast/out-of-funds")
    if response.status_code == 404:
        return CloudNotFound(line, "it may have been removed already", code="vast/not-found")
    return CloudError(line, "see https://docs.vast.ai for what it means", code="vast/error")
