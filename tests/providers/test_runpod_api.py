"""The RunPod client against the stateful RunPod emulator, over real HTTP on loopback."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
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
from lenslab.providers.runpod.api import RunPodClient
from lenslab.providers.runpod.records import PodSpec
from tests.support.http_emulator import DROP, Reply
from tests.support.runpod_emulator import RunPodEmulator

A100 = "NVIDIA A100 80GB PCIe"
FAST = RetryPolicy(max_attempts=4, initial_backoff=0.001, max_backoff=0.5)


class Sleeps:
    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[RunPodEmulator]:
    emulator = RunPodEmulator(tmp_path / "volumes")
    emulator.start()
    yield emulator
    emulator.stop()


def client(cloud: RunPodEmulator, sleeps: Sleeps | None = None, key: str | None = None) -> RunPodClient:
    return RunPodClient(key or cloud.api_key, cloud.graphql_url, cloud.rest_url, sleep=sleeps or Sleeps(), policy=FAST)


def spec(name: str = "lenslab-proj", **changes: Any) -> PodSpec:
    return PodSpec(name=name, image_name="lenslab/box:1", gpu_type_id=changes.pop("gpu_type_id", A100), **changes)


def test_offers_priced_per_pod_and_sorted_per_gpu_hour(cloud: RunPodEmulator) -> None:
    offers = {o.offer_id: o for o in client(cloud).offers(gpu_count=2)}
    a100 = offers[A100]
    assert (a100.gpu_name, a100.gpu_count, a100.vram_gb) == ("A100 PCIe", 2, 80)
    assert (a100.price_on_demand, a100.price_interruptible) == (3.28, 1.64)
    assert a100.available and a100.persistent_storage and a100.provider == "runpod"
    h100 = offers["NVIDIA H100 80GB HBM3"]
    assert not h100.available and h100.price_on_demand is None
    ranked = [o.gpu_name for o in cheapest_first(offers.values())]
    assert ranked == ["RTX 4090", "A100 PCIe", "H100 SXM"]
    # In one data center, for more GPUs than it has free: not available there.
    in_georgia = {o.offer_id: o for o in client(cloud).offers(gpu_count=4, data_center_id="US-GA-1")}
    assert not in_georgia[A100].available and in_georgia[A100].region == "US-GA-1"


def test_on_demand_pod_runs_stops_resumes_and_terminates(cloud: RunPodEmulator) -> None:
    runpod = client(cloud)
    pod = runpod.deploy(spec(data_center_id="US-GA-1"))
    assert cloud.gpus[A100].stock["US-GA-1"] == 1
    instance = runpod.pod(pod.id)
    assert instance is not None and instance.instance().state == RUNNING
    assert (instance.ssh_host, instance.ssh_port) == cloud.pods[pod.id]["_ssh"]
    assert not instance.interruptible and instance.cost_per_hr == 1.64
    runpod.stop(pod.id)
    assert [i.state for i in runpod.instances()] == [STOPPED]
    assert cloud.gpus[A100].stock["US-GA-1"] == 2
    runpod.resume(pod.id, gpu_count=1)
    assert [i.state for i in runpod.instances()] == [RUNNING]
    runpod.terminate(pod.id)
    assert runpod.pod(pod.id) is None and runpod.pods() == [] and cloud.pods == {}
    runpod.terminate(pod.id)  # already gone: still success


def test_resume_without_a_free_gpu_on_the_host_is_no_capacity(cloud: RunPodEmulator) -> None:
    runpod = client(cloud)
    pod = runpod.deploy(spec(data_center_id="US-GA-1", gpu_count=2))
    runpod.stop(pod.id)
    runpod.deploy(spec("someone-else", data_center_id="US-GA-1", gpu_count=2))
    with pytest.raises(CloudNoCapacity, match="not enough free GPUs"):
        runpod.resume(pod.id, gpu_count=2)


def test_spot_pod_is_preempted_and_bid_resumed(cloud: RunPodEmulator) -> None:
    runpod = client(cloud)
    with pytest.raises(CloudError, match="below the minimum bid"):
        runpod.rent_interruptible(spec(), bid_per_gpu=0.5)
    pod = runpod.rent_interruptible(spec(), bid_per_gpu=0.9)
    assert pod.interruptible and pod.instance().state == RUNNING and pod.cost_per_hr == 0.9
    cloud.preempt(pod.id)
    (seen,) = runpod.instances()
    assert (seen.state, seen.provider_status, seen.ssh_host) == (PREEMPTED, "EXITED", None)
    with pytest.raises(CloudError, match="podBidResume"):
        runpod.resume(pod.id, gpu_count=1)
    runpod.bid_resume(pod.id, gpu_count=1, bid_per_gpu=1.0)
    assert [i.state for i in runpod.instances()] == [RUNNING]
    cloud.preempt(pod.id, remove=True)  # RunPod may also take it away for good
    assert runpod.pod(pod.id) is None


def test_stuck_pod_stays_starting_and_hooks_give_the_ssh_endpoint(cloud: RunPodEmulator) -> None:
    launched: list[str] = []
    terminated: list[str] = []

    def on_launch(pod: dict[str, Any]) -> tuple[str, int]:
        launched.append(pod["id"])
        return ("10.1.2.3", 2222)

    cloud.on_launch = on_launch
    cloud.on_terminate = lambda pod: terminated.append(pod["id"])
    cloud.stuck_starting = True
    runpod = client(cloud)
    pod = runpod.deploy(spec())
    assert runpod.instances()[0].state == STARTING and runpod.instances()[0].ssh_host is None
    cloud.stuck_starting = False
    (up,) = runpod.instances()
    assert (up.state, up.ssh_host, up.ssh_port) == (RUNNING, "10.1.2.3", 2222)
    runpod.terminate(pod.id)
    assert launched == terminated == [pod.id]


def test_network_volume_outlives_pods_in_its_data_center(cloud: RunPodEmulator) -> None:
    runpod = client(cloud)
    volume = runpod.create_network_volume("lenslab-proj", 50, "US-GA-1")
    assert runpod.network_volumes() == [volume] and volume.data_center_id == "US-GA-1"
    directory = cloud.volume_root / "lenslab-proj"
    pod = runpod.deploy(spec(network_volume_id=volume.id))
    assert cloud.pods[pod.id]["_center"] == "US-GA-1"  # launched where the volume is
    (directory / "run.txt").write_text("step 7")
    with pytest.raises(CloudError, match="in use"):
        runpod.delete_network_volume(volume.id)
    runpod.terminate(pod.id)
    second = runpod.deploy(spec(network_volume_id=volume.id))
    assert (directory / "run.txt").read_text() == "step 7"
    runpod.terminate(second.id)
    runpod.delete_network_volume(volume.id)
    assert runpod.network_volumes() == [] and not directory.exists()
    runpod.delete_network_volume(volume.id)  # already gone: still success
    with pytest.raises(CloudError, match="unknown data center"):
        runpod.create_network_volume("lenslab-other", 10, "MARS-1")


def test_mapped_errors(cloud: RunPodEmulator) -> None:
    with pytest.raises(CloudKeyRefused, match="RunPod refused the API key") as refused:
        client(cloud, key="wrong-key").pods()
    assert "RUNPOD_API_KEY" in str(refused.value)
    with pytest.raises(CloudKeyRefused):
        client(cloud, key="wrong-key").network_volumes()
    runpod = client(cloud)
    with pytest.raises(CloudNoCapacity, match="no longer any instances available") as full:
        runpod.deploy(spec(gpu_type_id="NVIDIA H100 80GB HBM3"))
    assert "box.gpu_types" in str(full.value) and full.value.exit_code == 5
    cloud.balance = 0.5
    with pytest.raises(CloudOutOfFunds, match="do not have enough funds"):
        runpod.deploy(spec())
    with pytest.raises(CloudNotFound, match="Pod not found"):
        runpod.stop("no-such-pod")
    assert cloud.pods == {}


def test_429_storm_is_ridden_out_honouring_retry_after(cloud: RunPodEmulator) -> None:
    sleeps = Sleeps()
    cloud.throttle(3, retry_after="0.25")
    pod = client(cloud, sleeps).deploy(spec())  # a 429 never reached RunPod: safe to retry a create
    assert sleeps.calls == [0.25, 0.25, 0.25] and list(cloud.pods) == [pod.id]
    cloud.throttle(3, retry_after="")
    sleeps.calls.clear()
    client(cloud, sleeps).pods()
    assert sleeps.calls == [0.001, 0.002, 0.004]  # no Retry-After: exponential backoff
    cloud.throttle(10)
    with pytest.raises(CloudUnreachable, match="HTTP 429 after 4 attempts"):
        client(cloud).pods()


def test_server_errors_retried_for_reads_never_for_creates(cloud: RunPodEmulator) -> None:
    cloud.inject(Reply(502, b"<html>Bad Gateway</html>", "text/html"), times=2)
    assert client(cloud).pods() == []
    cloud.inject(Reply(500, {"errors": [{"message": "internal"}]}))
    before = len(cloud.requests)
    with pytest.raises(CloudOutcomeUnknown, match="HTTP 500"):
        client(cloud).deploy(spec())
    assert len(cloud.requests) == before + 1  # asked once, not again


def test_lost_reply_on_create_is_not_retried_and_found_by_name(cloud: RunPodEmulator) -> None:
    runpod = client(cloud)
    cloud.drop_create_replies = 1
    with pytest.raises(CloudOutcomeUnknown, match="podFindAndDeployOnDemand: the reply was lost") as lost:
        runpod.deploy(spec("lenslab-lost"))
    assert "by name" in str(lost.value)
    deploys = [r for r in cloud.requests if r[1] == "/graphql"]
    assert len(deploys) == 1
    assert [p.name for p in runpod.find_pods("lenslab-lost")] == ["lenslab-lost"]
    cloud.drop_create_replies = 1
    with pytest.raises(CloudOutcomeUnknown):
        runpod.create_network_volume("lenslab-lost", 10, "EU-RO-1")
    assert [v.name for v in runpod.network_volumes()] == ["lenslab-lost"]


@pytest.mark.parametrize(
    ("reply", "call", "problem"),
    [
        (Reply(200, b"<html>maintenance</html>", "text/html"), "pods",
         "GraphQL myself: unexpected reply (body: not JSON"),
        (Reply(200, None), "pods", "GraphQL myself: unexpected reply (body: expected an object, got null)"),
        (Reply(200, [1, 2]), "pods", "(body: expected an object, got a list)"),
        (Reply(200, {"data": {"myself": {"pods": [{"id": "p1"}]}}}), "pods",
         "data.myself.pods[0].desiredStatus: missing"),
        (Reply(200, {"data": {"myself": {"pods": {}}}}), "pods", "data.myself.pods: expected a list, got an object"),
        (Reply(200, {"data": {}}), "gpu_types", "GraphQL gpuTypes: unexpected reply (data.gpuTypes: missing)"),
        (Reply(200, {"errors": "boom"}), "pods", "body.errors: expected a list, got a string"),
        (Reply(200, {"data": {"gpuTypes": [{"id": "x", "displayName": "X", "memoryInGb": "80"}]}}), "gpu_types",
         "data.gpuTypes[0].memoryInGb: expected a finite number >= 0, got a string"),
        (Reply(200, {"error": "x"}, "application/json"), "network_volumes", "GET /networkvolumes: unexpected reply"),
    ],
)  # fmt: skip
def test_bad_reply_shapes_are_one_line(cloud: RunPodEmulator, reply: Reply, call: str, problem: str) -> None:
    cloud.inject(reply)
    with pytest.raises(CloudBadReply) as bad:
        getattr(client(cloud), call)()
    text = str(bad.value)
    assert problem in text and "\n" not in text and text.startswith("RunPod API ")


def test_dropped_reply_on_a_read_is_retried(cloud: RunPodEmulator) -> None:
    cloud.inject(DROP)
    assert client(cloud).pods() == []


def test_unreachable_api_is_one_line_after_retries() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sleeps = Sleeps()
    runpod = RunPodClient("k" * 20, f"http://127.0.0.1:{port}/graphql", sleep=sleeps, policy=FAST)
    with pytest.raises(CloudUnreachable, match="GraphQL myself did not answer"):
        runpod.pods()
    assert len(sleeps.calls) == FAST.max_attempts - 1


def test_api_key_never_in_a_url_a_message_or_repr(cloud: RunPodEmulator) -> None:
    runpod = client(cloud)
    messages: list[str] = []
    for action in (
        lambda: client(cloud, key=cloud.api_key + "-revoked").pods(),
        lambda: runpod.deploy(spec(gpu_type_id="NVIDIA H100 80GB HBM3")),
        lambda: runpod.stop("nope"),
        lambda: runpod.create_network_volume("v", 0, "EU-RO-1"),
    ):
        with pytest.raises(CloudError) as failed:
            action()
        messages.append(str(failed.value))
    runpod.deploy(spec())
    assert cloud.requests and all(cloud.api_key not in target for _, target, _ in cloud.requests)
    assert all(auth.startswith("Bearer ") for _, _, auth in cloud.requests)
    assert not any(cloud.api_key in m for m in messages)
    assert cloud.api_key not in repr(runpod)


def test_a_mutation_reply_without_the_pod_is_one_line(cloud: RunPodEmulator) -> None:
    pod = client(cloud).deploy(spec())
    cloud.inject(Reply(200, {"data": {"podStop": None}}))
    with pytest.raises(CloudBadReply, match=r"GraphQL podStop: unexpected reply \(data.podStop: expected an object"):
        client(cloud).stop(pod.id)
