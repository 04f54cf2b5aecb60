"""A small client of RunPod's API: GraphQL for pods and GPU prices, REST v1 for network volumes.

Sources read (official): runpod/runpod-python ``runpod/api/graphql.py`` (POST
``https://api.runpod.io/graphql``, ``Authorization: Bearer``, HTTP 401 for a bad key, failures
as HTTP 200 with ``{"errors": [{"message"}]}``), ``runpod/api/ctl_commands.py``,
``runpod/api/mutations/pods.py`` (``podFindAndDeployOnDemand``, ``podStop``, ``podResume``,
``podTerminate``), ``runpod/api/queries/pods.py`` (``myself { pods }``, ``pod(input: {podId})``),
``runpod/api/queries/gpus.py`` (``gpuTypes`` with ``lowestPrice(input: {gpuCount})
{ minimumBidPrice uninterruptablePrice }``), ``runpod/api/queries/user.py`` (``networkVolumes``),
``runpod/api/rest.py`` (REST errors carry ``detail``/``title``); docs.runpod.io "Manage Pods"
(GraphQL) and the REST v1 OpenAPI pages for ``/networkvolumes`` (https://rest.runpod.io/v1).

Which API for what, and why:
- Pods and prices: GraphQL. The official client uses it for every pod operation; it takes an
  explicit spot bid (``podRentInterruptable { bidPerGpu }``, resumed with ``podBidResume``) and
  reports ``minimumBidPrice`` and ``stockStatus`` per GPU count and data center, which offers and
  bids need. REST v1 also has ``/pods`` (``/pods/{id}/stop``, ``/start``, ``DELETE``) but no bid
  amount or minimum bid; docs.runpod.io now also publishes a REST v2, which no official client
  uses yet: moving there is a change to this module only.
- Network volumes: REST v1 (``GET/POST /networkvolumes``, ``DELETE /networkvolumes/{id}``):
  GraphQL has no documented volume mutation in the official client, REST v1 publishes one.
Values travel as GraphQL variables, never pasted into the query text, so a name cannot change
the query. The key goes only in the ``Authorization`` header (never ``?api_key=``, which the
docs show): it appears in no URL, message or ``repr``.

Errors: HTTP 401/403 → ``CloudKeyRefused``; a GraphQL ``errors`` message is mapped by its words
(``MESSAGES``) to no capacity, out of funds or not found, else a plain ``CloudError``. Retries
and lost replies follow ``lenslab.providers.offers.send``: a deploy, rent or volume create is
never retried after it may have reached RunPod; ``find_pods(name)`` finds what it made.
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
from lenslab.providers.runpod import records
from lenslab.providers.runpod.records import FIX, PROVIDER, GpuType, NetworkVolume, Pod, PodSpec

GRAPHQL_URL = "https://api.runpod.io/graphql"
REST_URL = "https://rest.runpod.io/v1"

# Words in RunPod's error messages -> (class, advice). Messages seen in RunPod's answers, e.g.
# "There are no longer any instances available with the requested specifications".
MESSAGES: tuple[tuple[tuple[str, ...], type[CloudError], str, str], ...] = (
    (
        ("no longer any instances", "not enough free gpus", "no instances available", "no gpus available"),
        CloudNoCapacity,
        "runpod/no-capacity",
        "try another GPU type, GPU count or data center (box.gpu_types, box.regions), or retry later",
    ),
    (
        ("insufficient", "enough funds", "balance", "add funds", "credit"),
        CloudOutOfFunds,
        "runpod/out-of-funds",
        "add credit to your RunPod account (Billing), then try again",
    ),
    (
        ("not found", "does not exist", "no pod", "no network volume"),
        CloudNotFound,
        "runpod/not-found",
        "it may have been removed already",
    ),
    (
        ("unauthorized", "api key", "forbidden"),
        CloudKeyRefused,
        "runpod/invalid-key",
        "set RUNPOD_API_KEY (or the key file) to a valid key from RunPod's console (Settings, API Keys)",
    ),
)


class RunPodClient:
    def __init__(
        self,
        api_key: str,
        graphql_url: str = GRAPHQL_URL,
        rest_url: str = REST_URL,
        *,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        policy: RetryPolicy | None = None,
    ) -> None:
        self._http = bearer_client(api_key, transport)
        self._sleep = sleep
        self._policy = policy or RetryPolicy()
        self.graphql_url = graphql_url
        self.rest_url = rest_url.rstrip("/")

    def __repr__(self) -> str:
        return f"RunPodClient({self.graphql_url!r}, {self.rest_url!r})"

    def close(self) -> None:
        self._http.close()

    # -- offers ------------------------------------------------------------------------------

    def gpu_types(
        self, gpu_count: int = 1, data_center_id: str | None = None, secure_cloud: bool | None = None
    ) -> list[GpuType]:
        """GPU types priced for ``gpu_count`` GPUs; a data center and a cloud (Secure or
        Community) narrow the price and stock to where a pod would be created."""
        lowest: dict[str, Any] = {"gpuCount": gpu_count}
        if data_center_id is not None:
            lowest["dataCenterId"] = data_center_id
        if secure_cloud is not None:
            lowest["secureCloud"] = secure_cloud
        data, shape = self._graphql("gpuTypes", records.GPU_TYPES, {"lowest": lowest})
        entries = shape.items(data, "data.gpuTypes")
        return [records.gpu_type(shape, e, f"data.gpuTypes[{i}]") for i, e in enumerate(entries)]

    def offers(
        self, gpu_count: int = 1, data_center_id: str | None = None, secure_cloud: bool | None = None
    ) -> list[Offer]:
        """Every GPU type for ``gpu_count`` GPUs, priced for the whole pod (in the data center, if given)."""
        types = self.gpu_types(gpu_count, data_center_id, secure_cloud)
        return [t.offer(gpu_count, data_center_id) for t in types]

    # -- pods --------------------------------------------------------------------------------

    def deploy(self, spec: PodSpec) -> Pod:
        """Create an on-demand pod. Never retried once it may have reached RunPod."""
        data, shape = self._graphql(
            "podFindAndDeployOnDemand", records.DEPLOY, {"input": spec.graphql_input()}, create=True
        )
        return records.pod(shape, data, "data.podFindAndDeployOnDemand")

    def rent_interruptible(self, spec: PodSpec, bid_per_gpu: float) -> Pod:
        """Create a spot pod bidding ``bid_per_gpu`` $/GPU-hour (at least the type's minimum bid)."""
        values = {**spec.graphql_input(), "bidPerGpu": bid_per_gpu}
        data, shape = self._graphql("podRentInterruptable", records.RENT_SPOT, {"input": values}, create=True)
        return records.pod(shape, data, "data.podRentInterruptable")

    def pods(self) -> list[Pod]:
        data, shape = self._graphql("myself", records.MY_PODS, {})
        pods = shape.items(shape.obj(data, "data.myself").get("pods"), "data.myself.pods")
        return [records.pod(shape, p, f"data.myself.pods[{i}]") for i, p in enumerate(pods)]

    def pod(self, pod_id: str) -> Pod | None:
        """The pod, or None once it is gone (terminated pods are not kept)."""
        data, shape = self._graphql("pod", records.ONE_POD, {"input": {"podId": pod_id}})
        return None if data is None else records.pod(shape, data, "data.pod")

    def find_pods(self, name: str) -> list[Pod]:
        """Pods named ``name``: how a deploy whose reply was lost is found."""
        return [p for p in self.pods() if p.name == name]

    def instances(self) -> list[Instance]:
        return [p.instance() for p in self.pods()]

    def stop(self, pod_id: str) -> None:
        """Stop the pod: its GPU goes back to the host, the volume is kept (billed while stopped)."""
        self._acknowledged("podStop", records.STOP, {"podId": pod_id})

    def resume(self, pod_id: str, gpu_count: int) -> None:
        """Start a stopped on-demand pod again (on the same machine: it may have no free GPU)."""
        self._acknowledged("podResume", records.RESUME, {"podId": pod_id, "gpuCount": gpu_count})

    def bid_resume(self, pod_id: str, gpu_count: int, bid_per_gpu: float) -> None:
        """Start an exited spot pod again with a new bid."""
        values = {"podId": pod_id, "gpuCount": gpu_count, "bidPerGpu": bid_per_gpu}
        self._acknowledged("podBidResume", records.BID_RESUME, values)

    def terminate(self, pod_id: str) -> None:
        """Remove the pod for good; a pod that is already gone counts as terminated."""
        try:
            self._graphql("podTerminate", records.TERMINATE, {"input": {"podId": pod_id}})
        except CloudNotFound:
            return

    # -- network volumes (REST v1) -------------------------------------------------------------

    def network_volumes(self) -> list[NetworkVolume]:
        shape = Shape(PROVIDER, "GET /networkvolumes", FIX)
        body = self._rest("GET", "/networkvolumes", shape)
        return [records.network_volume(shape, v, f"body[{i}]") for i, v in enumerate(shape.items(body, "body"))]

    def create_network_volume(self, name: str, size_gb: int, data_center_id: str) -> NetworkVolume:
        """Create a volume in ``data_center_id``. Never retried once it may have reached RunPod."""
        shape = Shape(PROVIDER, "POST /networkvolumes", FIX)
        payload = {"name": name, "size": size_gb, "dataCenterId": data_center_id}
        return records.network_volume(shape, self._rest("POST", "/networkvolumes", shape, payload), "body")

    def delete_network_volume(self, volume_id: str) -> None:
        """Delete a volume and its data; one that is already gone counts as deleted."""
        shape = Shape(PROVIDER, "DELETE /networkvolumes/{id}", FIX)
        try:
            self._rest("DELETE", f"/networkvolumes/{volume_id}", shape)
        except CloudNotFound:
            return

    # -- transport ---------------------------------------------------------------------------

    def _acknowledged(self, root: str, query: str, values: dict[str, Any]) -> None:
        """A pod mutation whose reply must name the pod it acted on."""
        data, shape = self._graphql(root, query, {"input": values})
        shape.text(shape.obj(data, f"data.{root}"), "id", f"data.{root}")

    def _graphql(self, root: str, query: str, variables: dict[str, Any], *, create: bool = False) -> tuple[Any, Shape]:
        """``data[root]`` of one GraphQL call, after its errors are mapped; the Shape names the call."""
        shape = Shape(PROVIDER, f"GraphQL {root}", FIX)
        response = send(
            self._http,
            "POST",
            self.graphql_url,
            provider=PROVIDER,
            endpoint=f"GraphQL {root}",
            policy=self._policy,
            sleep=self._sleep,
            create=create,
            json={"query": query, "variables": variables},
        )
        if response.status_code in (401, 403):
            raise _key_refused(response.status_code)
        body = shape.obj(shape.json(response), "body")
        errors = body.get("errors")
        if errors is not None:
            raise _graphql_error(shape, errors, root)
        if response.status_code >= 400:
            raise shape.fail("body", f"HTTP {response.status_code} without errors")
        data = shape.obj(body.get("data"), "body.data")
        if root not in data:
            raise shape.fail(f"data.{root}", "missing")
        return data[root], shape

    def _rest(self, method: str, path: str, shape: Shape, payload: dict[str, Any] | None = None) -> Any:
        response = send(
            self._http,
            method,
            self.rest_url + path,
            provider=PROVIDER,
            endpoint=shape.endpoint,
            policy=self._policy,
            sleep=self._sleep,
            create=method == "POST",
            json=payload,
        )
        status = response.status_code
        if status in (401, 403):
            raise _key_refused(status)
        if status >= 400:
            raise _rest_error(response, shape)
        if status == 204 or not response.content:
            return None
        return shape.json(response)


def _key_refused(status: int) -> CloudKeyRefused:
    advice = next(m for m in MESSAGES if m[1] is CloudKeyRefused)[3]
    return CloudKeyRefused(f"RunPod refused the API key (HTTP {status})", advice, code="runpod/invalid-key")


def _classify(message: str, status: int | None = None) -> CloudError:
    lowered = message.lower()
    for words, cls, code, advice in MESSAGES:
        if any(w in lowered for w in words):
            return cls(f"RunPod: {message}", advice, code=code)
    if status == 404:
        return CloudNotFound(f"RunPod: {message}", "it may have been removed already", code="runpod/not-found")
    return CloudError(f"RunPod: {message}", "see https://docs.runpod.io for what it means", code="runpod/error")


def _graphql_error(shape: Shape, errors: Any, root: str) -> CloudError:
    first = shape.obj(shape.items(errors, "body.errors")[0] if errors else None, "body.errors[0]")
    message = first.get("message")
    if not isinstance(message, str):
        raise shape.fail("body.errors[0].message", "expected a string")
    return _classify(first_line(message))


def _rest_error(response: httpx.Response, shape: Shape) -> CloudError:
    try:
        body = response.json()
    except ValueError:
        body = None
    message = ""
    if isinstance(body, dict):
        for key in ("detail", "title", "error", "message"):
            if isinstance(body.get(key), str) and body[key]:
                message = body[key]
                break
    text = first_line(message) if message else f"HTTP {response.status_code}"
    return _classify(f"{shape.endpoint}: {text}", response.status_code)
