"""The vast.ai client against the stateful vast.ai emulator, over real HTTP on loopback."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from lenslab.providers.offers import (
    PREEMPTED,
    RUNNING,
    STARTING,
    STOPPED,
    CloudBadReply,
    CloudError,
    CloudKeyRefused,
    CloudNoCapacity,
    CloudNotFound,
    CloudOutcomeUnknown,
    CloudOutOfFunds,
    CloudUnreachable,
    RetryPolicy,
    cheapest_first,
)
from lenslab.providers.vast.api import VastClient
from lenslab.providers.vast.records import InstanceSpec
from tests.support.http_emulator import DROP, Reply
from tests.support.vast_emulator import VastEmulator

FAST = RetryPolicy(max_attempts=4, initial_backoff=0.001, max_backoff=0.5)
SPEC = InstanceSpec(label="lenslab-proj", image="lenslab/box:1", env={"LENSLAB": "1", "-p 2222:2222": "1"})


class Sleeps:
    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


@pytest.fixture
def cloud() -> Iterator[VastEmulator]:
    emulator = VastEmulator()
    emulator.start()
    yield emulator
    emulator.stop()


def client(cloud: VastEmulator, sleeps: Sleeps | None = None, key: str | None = None) -> VastClient:
    return VastClient(key or cloud.api_key, cloud.url, sleep=sleeps or Sleeps(), policy=FAST)


def test_offers_filtered_in_gb_and_sorted(cloud: VastEmulator) -> None:
    vast = client(cloud)
    offers = vast.offers()
    assert [o.offer_id for o in offers] == ["5001", "5002", "5004", "5003"]  # by dph_total
    rtx = offers[0]
    assert (rtx.gpu_name, rtx.gpu_count, rtx.vram_gb, rtx.region) == ("RTX 4090", 1, 24.6, "Texas, US")
    assert (rtx.price_on_demand, rtx.price_interruptible, rtx.available) == (0.42, 0.18, True)
    assert not rtx.persistent_storage and rtx.provider == "vast"
    big = vast.offers(min_vram_gb=80, gpu_name="A100 SXM4")
    assert [o.offer_id for o in big] == ["5002", "5003"]
    assert [o.offer_id for o in vast.offers(interruptible=True, gpu_count=1)] == ["5001", "5002", "5004"]
    per_gpu = cheapest_first(big, interruptible=True)
    assert [o.offer_id for o in per_gpu] == ["5003", "5002"]  # 1.10/2 < 0.61 per GPU-hour


def test_on_demand_instance_runs_stops_starts_and_is_destroyed(cloud: VastEmulator) -> None:
    vast = client(cloud)
    instance_id = vast.create_instance("5002", SPEC)
    sent = cloud.instances[int(instance_id)]
    assert (sent["label"], sent["image_uuid"], sent["extra_env"], sent["is_bid"]) == (
        "lenslab-proj", "lenslab/box:1", [["LENSLAB", "1"], ["-p 2222:2222", "1"]], False,
    )  # fmt: skip
    row = vast.instance(instance_id)
    assert row is not None and row.normalised().state == RUNNING
    assert (row.ssh_host, row.ssh_port) == cloud.instances[int(instance_id)]["_ssh"]
    assert "5002" not in [o.offer_id for o in vast.offers()]  # rented: no longer offered
    vast.stop(instance_id)
    assert [i.state for i in vast.normalised()] == [STOPPED]
    vast.start(instance_id)
    assert [i.state for i in vast.normalised()] == [RUNNING]
    vast.destroy(instance_id)
    assert vast.instance(instance_id) is None and vast.instances() == [] and cloud.instances == {}
    vast.destroy(instance_id)  # already gone: still success
    assert "5002" in [o.offer_id for o in vast.offers()]


def test_interruptible_instance_outbid_and_back(cloud: VastEmulator) -> None:
    vast = client(cloud)
    with pytest.raises(CloudError, match=r"Bid price must be at least 0\.61"):
        vast.create_instance("5002", SPEC, bid_price=0.3)
    instance_id = vast.create_instance("5002", SPEC, bid_price=0.7)
    (row,) = vast.normalised()
    assert row.interruptible and row.state == RUNNING and row.price_per_hour == 0.7
    cloud.preempt(instance_id)
    (outbid,) = vast.normalised()
    assert (outbid.state, outbid.provider_status) == (PREEMPTED, "running/exited")
    vast.change_bid(instance_id, 0.8)
    assert [i.state for i in vast.normalised()] == [RUNNING]
    vast.stop(instance_id)  # its owner's stop reads as stopped, not outbid
    assert [i.state for i in vast.normalised()] == [STOPPED]


def test_stuck_instance_stays_starting_and_hooks_give_the_ssh_endpoint(cloud: VastEmulator) -> None:
    events: list[tuple[str, int]] = []

    def on_launch(row: dict[str, Any]) -> tuple[str, int]:
        events.append(("launch", row["id"]))
        return ("10.9.8.7", 2200)

    cloud.on_launch = on_launch
    cloud.on_stop = lambda row: events.append(("stop", row["id"]))
    cloud.on_terminate = lambda row: events.append(("terminate", row["id"]))
    cloud.stuck_starting = True
    vast = client(cloud)
    instance_id = vast.create_instance("5001", SPEC)
    assert [(i.state, i.ssh_host) for i in vast.normalised()] == [(STARTING, None)]
    cloud.stuck_starting = False
    assert [(i.state, i.ssh_host, i.ssh_port) for i in vast.normalised()] == [(RUNNING, "10.9.8.7", 2200)]
    vast.stop(instance_id)
    vast.destroy(instance_id)
    number = int(instance_id)
    assert events == [("launch", number), ("stop", number), ("terminate", number)]


def test_mapped_errors(cloud: VastEmulator) -> None:
    with pytest.raises(CloudKeyRefused, match=r"vast\.ai refused the API key") as refused:
        client(cloud, key="wrong-key").instances()
    assert "VAST_API_KEY" in str(refused.value)
    vast = client(cloud)
    vast.create_instance("5001", SPEC)
    with pytest.raises(CloudNoCapacity, match="no longer available") as taken:
        vast.create_instance("5001", SPEC)
    assert "lenslab offers" in str(taken.value) and taken.value.exit_code == 5
    cloud.credit = 0.2
    with pytest.raises(CloudOutOfFunds, match="lacks credit"):
        vast.create_instance("5002", SPEC)
    with pytest.raises(CloudNotFound, match="Instance 42 not found"):
        vast.stop("42")
    # vast.ai also answers failures with HTTP 200 and "success": false.
    cloud.inject(Reply(200, {"success": False, "error": "insufficient_credit", "msg": "No credit."}))
    with pytest.raises(CloudOutOfFunds, match="No credit"):
        vast.start("42")
    assert len(cloud.instances) == 1


def test_429_storm_is_ridden_out_honouring_retry_after(cloud: VastEmulator) -> None:
    sleeps = Sleeps()
    cloud.throttle(3, retry_after="0.2")
    assert client(cloud, sleeps).create_instance("5001", SPEC)  # a 429 never reached vast.ai
    assert sleeps.calls == [0.2, 0.2, 0.2] and len(cloud.instances) == 1
    cloud.throttle(10, retry_after="120")
    sleeps.calls.clear()
    with pytest.raises(CloudUnreachable, match="HTTP 429 after 4 attempts"):
        client(cloud, sleeps).instances()
    assert sleeps.calls == [0.5, 0.5, 0.5]  # Retry-After capped by the policy


def test_server_errors_retried_for_reads_never_for_creates(cloud: VastEmulator) -> None:
    cloud.inject(Reply(503, b"<html>unavailable</html>", "text/html"), times=2)
    assert client(cloud).instances() == []
    cloud.inject(Reply(502, b"bad gateway", "text/plain"))
    before = len(cloud.requests)
    with pytest.raises(CloudOutcomeUnknown, match="HTTP 502"):
        client(cloud).create_instance("5001", SPEC)
    assert len(cloud.requests) == before + 1


def test_lost_reply_on_create_is_not_retried_and_found_by_label(cloud: VastEmulator) -> None:
    vast = client(cloud)
    cloud.drop_create_replies = 1
    with pytest.raises(CloudOutcomeUnknown, match=r"PUT /asks/\{id\}/: the reply was lost"):
        vast.create_instance("5004", InstanceSpec(label="lenslab-lost", image="lenslab/box:1"))
    assert [r for r in cloud.requests if r[0] == "PUT"] == [("PUT", "/api/v0/asks/5004/", f"Bearer {cloud.api_key}")]
    assert [i.label for i in vast.find_instances("lenslab-lost")] == ["lenslab-lost"]


def test_dropped_reply_on_a_read_is_retried(cloud: VastEmulator) -> None:
    cloud.inject(DROP)
    assert client(cloud).instances() == []


@pytest.mark.parametrize(
    ("reply", "call", "problem"),
    [
        (Reply(200, b"<!doctype html><p>login</p>", "text/html"), "instances",
         "vast.ai API GET /instances: unexpected reply (body: not JSON (text/html, HTTP 200))"),
        (Reply(200, None), "instances", "GET /instances: unexpected reply (body: expected an object, got null)"),
        (Reply(200, []), "offers", "POST /bundles/: unexpected reply (body: expected an object, got a list)"),
        (Reply(200, {"offers": [{"id": 1, "gpu_name": "X", "num_gpus": 1}]}), "offers",
         "body.offers[0].gpu_ram: missing"),
        (Reply(200, {"offers": [{"id": 1, "gpu_name": "X", "num_gpus": 1.5, "gpu_ram": 1}]}), "offers",
         "body.offers[0].num_gpus: expected a whole number"),
        (Reply(200, b'{"instances": [{"id": 1, "dph_total": NaN}]}'), "instances",
         "body.instances[0].dph_total: expected a finite number >= 0, got a number"),
        (Reply(200, b'{"offers": [{"id": 1, "gpu_name": "X", "num_gpus": 1, "gpu_ram": Infinity}]}'), "offers",
         "body.offers[0].gpu_ram: expected a finite number >= 0"),
        (Reply(200, {"instances": [{"label": "x"}]}), "instances", "body.instances[0].id: missing"),
        (Reply(200, {"instances": [{"id": 1, "ports": {"2222/tcp": [{"HostPort": "x"}]}}]}), "instances",
         "body.instances[0].ports.2222/tcp[0].HostPort: expected a port number"),
        (Reply(200, {"instances": [{"id": 1, "ports": {"2222/tcp": "41022"}}]}), "instances",
         "body.instances[0].ports.2222/tcp: expected a list, got a string"),
    ],
)  # fmt: skip
def test_bad_reply_shapes_are_one_line(cloud: VastEmulator, reply: Reply, call: str, problem: str) -> None:
    cloud.inject(reply)
    with pytest.raises(CloudBadReply) as bad:
        getattr(client(cloud), call)()
    text = str(bad.value)
    assert problem in text and "\n" not in text


def test_create_reply_without_the_new_id_is_one_line(cloud: VastEmulator) -> None:
    cloud.inject(Reply(200, {"success": True}))
    with pytest.raises(CloudBadReply, match=r"PUT /asks/\{id\}/: unexpected reply \(body.new_contract: missing\)"):
        client(cloud).create_instance("5001", SPEC)


def test_api_key_never_in_a_url_a_message_or_repr(cloud: VastEmulator) -> None:
    vast = client(cloud)
    failures: list[Any] = [
        lambda: client(cloud, key=cloud.api_key + "x").instances(),
        lambda: vast.stop("7"),
        lambda: vast.create_instance("1", SPEC),
    ]
    messages = []
    for action in failures:
        with pytest.raises(CloudError) as failed:
            action()
        messages.append(str(failed.value))
    vast.create_instance("5001", SPEC, bid_price=0.5)
    vast.offers()
    assert cloud.requests and all(cloud.api_key not in target for _, target, _ in cloud.requests)
    assert all(auth.startswith("Bearer ") for _, _, auth in cloud.requests)
    assert not any(cloud.api_key in m for m in messages)
    assert cloud.api_key not in repr(vast)


def test_latency_is_per_call_and_calls_overlap(cloud: VastEmulator) -> None:
    """What the offers benchmark relies on: a fixed delay per call that concurrent callers share."""
    # A long delay, so that a loaded machine's own slowness cannot pass for serial calls.
    cloud.latency_seconds = 1.0
    vast = client(cloud)
    started = time.monotonic()
    vast.offers()
    one = time.monotonic() - started
    started = time.monotonic()
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: client(cloud).offers(), range(3)))
    three = time.monotonic() - started
    assert one >= 1.0 and all(len(r) == 4 for r in results)
    assert three < 2.5  # overlapped, not one after another (3 s)
