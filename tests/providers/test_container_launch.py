"""Launching RunPod and vast.ai container boxes against the stateful emulators, over real HTTP
on loopback: what is created (the payloads the official clients send), consent, the boot
deadline, lost replies, budget and cost. The instances here are records only (no container);
tests/lenslab/test_container_boxes.py runs them as real containers."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lenslab.config import BoxConfig
from lenslab.errors import BootFailed, ConfigError, ProviderError
from lenslab.providers import container_ledger
from lenslab.providers.offers import (
    CloudKeyRefused,
    CloudNoCapacity,
    CloudOutOfFunds,
    Offer,
    RetryPolicy,
)
from lenslab.providers.runpod.api import RunPodClient
from lenslab.providers.runpod.provider import RunPodApi, RunPodProvider
from lenslab.providers.vast.api import VastClient
from lenslab.providers.vast.provider import VastApi, VastProvider
from tests.support.http_emulator import DROP
from tests.support.runpod_emulator import GraphQLFailure, RunPodEmulator
from tests.support.vast_emulator import VastEmulator

FAST = RetryPolicy(max_attempts=6, initial_backoff=0.001, max_backoff=0.01)
PUBLIC_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ7u1ej3dUWAB0Da6p5p0O4ORw8Co0jT4vkuX7oWEk1G lenslab"


class Clock:
    """A fake clock that sleeping moves on: deadlines pass without waiting."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


@pytest.fixture
def key(tmp_path: Path) -> Path:
    private = tmp_path / "id_ed25519"
    private.write_text("not used: nothing connects here\n")
    Path(f"{private}.pub").write_text(PUBLIC_KEY + "\n")
    return private


@pytest.fixture
def runpod(tmp_path: Path) -> Iterator[RunPodEmulator]:
    emulator = RunPodEmulator(tmp_path / "volumes").start()
    yield emulator
    emulator.stop()
    assert not emulator.live_pods(), "a pod was left behind"


@pytest.fixture
def vast() -> Iterator[VastEmulator]:
    emulator = VastEmulator().start()
    yield emulator
    emulator.stop()
    assert not emulator.instances, "an instance was left behind"


def box(provider: str, key: Path, **fields: Any) -> BoxConfig:
    return BoxConfig(name="t", provider=provider, identity_file=str(key), **fields)


def runpod_provider(
    cloud: RunPodEmulator, *, yes: bool = True, clock: Clock | None = None, api_key: str | None = None
) -> tuple[RunPodProvider, list[str]]:
    asked: list[str] = []

    def confirm(what: str) -> bool:
        asked.append(what)
        return yes

    clock = clock or Clock()
    client = RunPodClient(api_key or cloud.api_key, cloud.graphql_url, cloud.rest_url, sleep=clock.sleep, policy=FAST)
    provider = RunPodProvider(RunPodApi(client), confirm=confirm, sleep=clock.sleep, clock=clock, warn=lambda _: None)
    return provider, asked


def vast_provider(cloud: VastEmulator, *, clock: Clock | None = None) -> VastProvider:
    clock = clock or Clock()
    client = VastClient(cloud.api_key, cloud.url, sleep=clock.sleep, policy=FAST)
    return VastProvider(VastApi(client), confirm=lambda _: True, sleep=clock.sleep, clock=clock)


def offer_4090() -> Offer:
    return Offer("runpod", "NVIDIA GeForce RTX 4090", "RTX 4090", 1, 24, "", 0.69, 0.29, True, True)


def gql_input(cloud: RunPodEmulator) -> dict[str, Any]:
    (pod,) = cloud.pods.values()
    spec: dict[str, Any] = pod["_spec"]
    return spec


# -- RunPod ------------------------------------------------------------------------------------


def test_runpod_launch_creates_the_volume_and_a_pod_of_lenslabs_image(runpod: RunPodEmulator, key: Path) -> None:
    provider, asked = runpod_provider(runpod)
    cfg = box("runpod", key, image="lenslab:1.2")
    got = provider.launch_offer(cfg, offer_4090())
    assert asked == [
        "launch 1x RTX 4090 (24 GB) on runpod in EU-RO-1 at $0.69/hour; and create network volume lenslab-t "
        "(50 GB, billed per GB-month) there"
    ]
    (volume,) = runpod.volumes.values()
    sent = gql_input(runpod)
    assert (sent["name"], sent["imageName"], sent["dockerArgs"], sent["ports"]) == (
        "lenslab-t", "lenslab:1.2", "lenslab-box serve", "2222/tcp")  # fmt: skip
    assert (sent["networkVolumeId"], sent["volumeMountPath"], sent["dataCenterId"]) == (volume["id"], "/lab", "EU-RO-1")
    env = {e["key"]: e["value"] for e in sent["env"]}
    autostop = json.loads(env.pop("LENSLAB_AUTOSTOP"))  # the watcher's settings until `up` writes them
    assert env == {"LENSLAB_PUBLIC_KEY": PUBLIC_KEY, "LENSLAB_ROOT": "/lab", "LENSLAB_BOX": "t"}
    assert (autostop["idle_minutes"], autostop["price_per_hour_usd"], autostop["instance_id_env"]) == (
        30, 0.69, "RUNPOD_POD_ID")  # fmt: skip
    (pod,) = runpod.pods.values()
    assert (got.user, got.host, got.port) == ("lab", "127.0.0.1", pod["_ssh"][1])
    assert (got.root, got.alias) == ("/lab", "lenslab-t")
    # Launching again reuses the pod: nothing new is created, nothing is asked.
    again = provider.launch(cfg)
    assert (again.host, again.port) == (got.host, got.port) and len(runpod.pods) == 1 and len(asked) == 1
    cost = provider.cost("t")
    assert cost is not None and cost["price_per_hour_usd"] == 0.69 and cost["billed_hours"] is not None
    provider.terminate(got)
    assert not runpod.pods and list(runpod.volumes) == [volume["id"]]  # the volume is kept


def test_runpod_second_pod_goes_where_the_volume_is_and_mounts_it(runpod: RunPodEmulator, key: Path) -> None:
    provider, asked = runpod_provider(runpod)
    runpod.volumes.clear()
    client = RunPodClient(runpod.api_key, runpod.graphql_url, runpod.rest_url)
    volume = client.create_network_volume("lenslab-t", 10, "US-GA-1")
    client.close()
    a100 = Offer("runpod", "NVIDIA A100 80GB PCIe", "A100 PCIe", 1, 80, "", 1.64, 0.82, True, True)
    provider.launch_offer(box("runpod", key), a100)
    assert asked[0].endswith("in US-GA-1 at $1.64/hour")  # nothing else to create
    assert gql_input(runpod)["networkVolumeId"] == volume.id
    provider.terminate(provider.get(box("runpod", key)))  # type: ignore[arg-type]
    # The 4090 is free only in EU-RO-1: a volume cannot move, so that is no capacity, in one line.
    with pytest.raises(CloudNoCapacity, match="no RTX 4090 free in US-GA-1, where your network volume lenslab-t is"):
        provider.launch_offer(box("runpod", key), offer_4090())
    assert not runpod.pods


def test_runpod_launch_keeps_one_pod_of_two_left_by_an_earlier_lost_reply(runpod: RunPodEmulator, key: Path) -> None:
    from lenslab.providers.runpod.records import PodSpec

    client = RunPodClient(runpod.api_key, runpod.graphql_url, runpod.rest_url)
    first = client.deploy(PodSpec(name="lenslab-t", image_name="img", gpu_type_id="NVIDIA GeForce RTX 4090"))
    client.deploy(PodSpec(name="lenslab-t", image_name="img", gpu_type_id="NVIDIA GeForce RTX 4090"))
    client.close()
    provider, asked = runpod_provider(runpod)
    got = provider.launch(box("runpod", key))
    assert [p["id"] for p in runpod.live_pods()] == [first.id] and not asked  # reused, nothing new
    assert [i["id"] for i in provider.instances_seen()] == [first.id]
    provider.terminate(got)


def test_a_pod_found_running_is_costed_from_its_uptime_or_else_from_when_it_was_found(
    runpod: RunPodEmulator, key: Path
) -> None:
    from lenslab.providers.runpod.records import PodSpec

    client = RunPodClient(runpod.api_key, runpod.graphql_url, runpod.rest_url)
    pod = client.deploy(PodSpec(name="lenslab-t", image_name="img", gpu_type_id="NVIDIA GeForce RTX 4090"))
    client.close()
    runpod.pods[pod.id]["_started"] -= 7200  # launched two hours ago, from another laptop
    provider, _ = runpod_provider(runpod)
    got = provider.launch(box("runpod", key))
    ledger = container_ledger.read("runpod", "t")
    assert ledger.launched_at is not None and ledger.launched_at == pytest.approx(time.time() - 7200, abs=60)
    assert provider.cost("t")["cost_usd"] == pytest.approx(2 * ledger.price_per_hour, abs=0.05)  # type: ignore[index]
    assert ledger.price_per_hour > 0
    provider.terminate(got)

    runpod.stuck_starting = True  # found before its runtime (and uptime) is reported
    client = RunPodClient(runpod.api_key, runpod.graphql_url, runpod.rest_url)
    client.deploy(PodSpec(name="lenslab-t", image_name="img", gpu_type_id="NVIDIA GeForce RTX 4090"))
    client.close()
    warned: list[str] = []
    provider, _ = runpod_provider(runpod)
    provider.warn = warned.append
    with pytest.raises(BootFailed):
        provider.launch(box("runpod", key, boot_timeout_minutes=1.0))
    assert any("gives no start time: its cost counts from now" in line for line in warned), warned


def test_runpod_no_consent_creates_nothing(runpod: RunPodEmulator, key: Path) -> None:
    provider, _ = runpod_provider(runpod, yes=False)
    with pytest.raises(ProviderError, match="not launched: lenslab would launch 1x RTX 4090"):
        provider.launch_offer(box("runpod", key), offer_4090())
    assert not runpod.pods and not runpod.volumes


def test_runpod_launch_without_an_offer_takes_the_first_gpu_type_available(runpod: RunPodEmulator, key: Path) -> None:
    provider, asked = runpod_provider(runpod)
    got = provider.launch(box("runpod", key, gpu_types=["H100", "A100"]))  # no H100 is free
    assert "A100 PCIe" in asked[0] and got.host == "127.0.0.1"
    provider.terminate(got)


def test_runpod_stuck_starting_is_terminated_at_the_deadline(runpod: RunPodEmulator, key: Path) -> None:
    clock = Clock()
    provider, _ = runpod_provider(runpod, clock=clock)
    runpod.stuck_starting = True
    with pytest.raises(BootFailed, match=r"was still starting after 60 s; lenslab terminated it so it does not bill"):
        provider.launch_offer(box("runpod", key, boot_timeout_minutes=1.0), offer_4090())
    assert not runpod.pods and sum(clock.sleeps) >= 60
    assert container_ledger.read("runpod", "t").instance_id == ""  # nothing is billing


def test_a_failed_boot_whose_terminate_fails_says_it_may_bill_and_keeps_the_ledger(
    runpod: RunPodEmulator, key: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider, _ = runpod_provider(runpod)
    runpod.stuck_starting = True
    terminate = runpod._op_podTerminate

    def refused(variables: dict[str, Any]) -> Any:
        raise GraphQLFailure("Something went wrong. Please try again later.")

    monkeypatch.setattr(runpod, "_op_podTerminate", refused)
    cfg = box("runpod", key, boot_timeout_minutes=1.0)
    with pytest.raises(BootFailed) as caught:
        provider.launch_offer(cfg, offer_4090())
    message = str(caught.value)
    assert "could not terminate it" in message and "may still bill" in message and "`lenslab down`" in message
    assert "does not bill" not in message
    (pod,) = runpod.pods.values()
    assert container_ledger.read("runpod", "t").instance_id == pod["id"]  # still counted by budget_usd
    monkeypatch.setattr(runpod, "_op_podTerminate", terminate)
    found = provider.get(cfg)
    assert found is not None
    provider.terminate(found)  # what `lenslab down` does
    assert not runpod.pods and container_ledger.read("runpod", "t").instance_id == ""


def test_a_pod_not_listed_just_after_its_create_is_looked_at_again(
    runpod: RunPodEmulator, key: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider, _ = runpod_provider(runpod)
    lookup, misses = runpod._op_pod, [2]

    def lagging(variables: dict[str, Any]) -> Any:
        if misses[0]:
            misses[0] -= 1
            return None  # the API's listing lags the create
        return lookup(variables)

    monkeypatch.setattr(runpod, "_op_pod", lagging)
    got = provider.launch_offer(box("runpod", key), offer_4090())
    assert len(runpod.pods) == 1 and not misses[0]
    provider.terminate(got)


def test_runpod_lost_create_reply_makes_exactly_one_pod_and_one_volume(runpod: RunPodEmulator, key: Path) -> None:
    provider, _ = runpod_provider(runpod)
    runpod.drop_create_replies = 2  # the volume's reply and the pod's reply are both lost
    got = provider.launch_offer(box("runpod", key), offer_4090())
    assert len(runpod.volumes) == 1 and len(runpod.pods) == 1
    (pod,) = runpod.pods.values()
    assert container_ledger.read("runpod", "t").instance_id == pod["id"]
    provider.terminate(got)


def test_runpod_lost_request_of_a_create_that_did_not_happen_is_sent_again(runpod: RunPodEmulator, key: Path) -> None:
    clock = Clock()
    provider, _ = runpod_provider(runpod, clock=clock)

    def confirm(what: str) -> bool:
        # Right after consent the next GraphQL call is the deploy: its connection drops
        # before RunPod acted on it, so no pod of that name appears and it is sent again.
        runpod.inject(DROP, times=1, path_prefix="/graphql")
        return True

    provider.confirm = confirm
    provider.launch_offer(box("runpod", key), offer_4090())
    deploys = [r for r in runpod.requests if r[1] == "/graphql"]
    assert len(runpod.pods) == 1 and clock.sleeps  # it looked for the pod (and waited) before re-sending
    assert len(deploys) >= 2
    provider.terminate(provider.get(box("runpod", key)))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("setup", "error", "words"),
    [
        (lambda c: c.gpus["NVIDIA GeForce RTX 4090"].stock.clear(), CloudNoCapacity, "no RTX 4090 free"),
        (lambda c: setattr(c, "balance", 0.1), CloudOutOfFunds, "enough funds"),
    ],
)
def test_runpod_launch_errors_are_one_line_and_leave_no_pod(
    runpod: RunPodEmulator, key: Path, setup: Any, error: type[Exception], words: str
) -> None:
    setup(runpod)
    provider, _ = runpod_provider(runpod)
    with pytest.raises(error, match=words) as raised:
        provider.launch_offer(box("runpod", key), offer_4090())
    assert "\n" not in str(raised.value) and not runpod.pods


def test_runpod_invalid_key_and_429_storm(runpod: RunPodEmulator, key: Path) -> None:
    bad, _ = runpod_provider(runpod, api_key="wrong")
    with pytest.raises(CloudKeyRefused, match="RunPod refused the API key"):
        bad.launch_offer(box("runpod", key), offer_4090())
    runpod.throttle(4)  # a storm of 429s is ridden out: still one pod
    provider, _ = runpod_provider(runpod)
    got = provider.launch_offer(box("runpod", key), offer_4090())
    assert len(runpod.pods) == 1
    provider.terminate(got)


def test_budget_refuses_a_launch_it_cannot_pay_one_hour_of(runpod: RunPodEmulator, key: Path) -> None:
    provider, asked = runpod_provider(runpod)
    container_ledger.write("runpod", "t", container_ledger.Ledger(spent_usd=9.5))
    with pytest.raises(ProviderError, match=r"box.budget_usd \$10.00 has \$0.50 left, less than one hour at \$0.69"):
        provider.launch_offer(box("runpod", key, budget_usd=10.0), offer_4090())
    assert not asked and not runpod.pods and not runpod.volumes


def test_terminate_adds_the_instance_cost_to_what_the_box_spent(runpod: RunPodEmulator, key: Path) -> None:
    provider, _ = runpod_provider(runpod)
    got = provider.launch_offer(box("runpod", key), offer_4090())
    ledger = container_ledger.read("runpod", "t")
    two_hours_ago = json.loads(container_ledger.path("runpod", "t").read_text())
    two_hours_ago["launched_at"] = ledger.launched_at - 7200  # type: ignore[operator]
    container_ledger.path("runpod", "t").write_text(json.dumps(two_hours_ago))
    assert provider.cost("t")["cost_usd"] == pytest.approx(1.38, abs=0.01)  # type: ignore[index]
    provider.terminate(got)
    assert container_ledger.read("runpod", "t").spent_usd == pytest.approx(1.38, abs=0.01)


@pytest.mark.parametrize("text", ["{not json", "[]", '{"spent_usd": "lots"}', '{"spent_usd": NaN}'])
def test_a_broken_ledger_is_refused_not_taken_as_nothing_spent(runpod: RunPodEmulator, key: Path, text: str) -> None:
    provider, asked = runpod_provider(runpod)
    file = container_ledger.path("runpod", "t")
    container_ledger.write("runpod", "t", container_ledger.Ledger(spent_usd=9.5))
    file.write_text(text)
    with pytest.raises(ConfigError) as caught:
        provider.launch_offer(box("runpod", key, budget_usd=10.0), offer_4090())
    message = str(caught.value)
    assert message.startswith(f"{file}: lenslab's record of this box's spending is broken") and "\n" not in message
    assert "delete it" in message and not asked and not runpod.pods
    assert file.read_text() == text  # left for the user to fix, not overwritten


# -- vast.ai -----------------------------------------------------------------------------------


def test_vast_refuses_without_a_mirror_before_any_request(vast: VastEmulator, key: Path) -> None:
    offer = Offer("vast", "5002", "A100 SXM4", 1, 81.9, "Sweden, SE", 1.25, 0.61, True, False)
    with pytest.raises(ProviderError, match=r"vast\.ai keeps nothing after an instance is gone") as raised:
        vast_provider(vast).launch_offer(box("vast", key), offer)
    assert "box.mirror" in str(raised.value) and vast.requests == [] and not vast.instances


def test_vast_launch_rents_the_ask_with_the_box_command_and_port(vast: VastEmulator, key: Path) -> None:
    provider = vast_provider(vast)
    offer = Offer("vast", "5002", "A100 SXM4", 1, 81.9, "Sweden, SE", 1.25, 0.61, True, False)
    cfg = box("vast", key, mirror="s3://bucket/lenslab", image="lenslab:1.2")
    got = provider.launch_offer(cfg, offer)
    (row,) = vast.instances.values()
    sent = row["_body"]
    assert (sent["image"], sent["runtype"], sent["args"], sent["label"], sent["price"]) == (
        "lenslab:1.2", "args", ["lenslab-box", "serve"], "lenslab-t", None)  # fmt: skip
    assert json.loads(sent["env"].pop("LENSLAB_AUTOSTOP"))["price_per_hour_usd"] > 0
    assert sent["env"] == {
        "LENSLAB_PUBLIC_KEY": PUBLIC_KEY, "LENSLAB_ROOT": "/lab", "LENSLAB_BOX": "t",
        "-p 2222:2222": "1", "LENSLAB_MIRROR": "s3://bucket/lenslab",
    }  # fmt: skip
    assert (got.user, got.host, got.port) == ("lab", "127.0.0.1", row["_ssh"][1])
    provider.get(cfg)
    cost = provider.cost("t")
    assert cost is not None and cost["price_per_hour_usd"] == 1.25 and cost["billed_hours"] is not None
    provider.terminate(got)


def test_vast_lost_reply_is_one_instance_and_stuck_one_is_destroyed(vast: VastEmulator, key: Path) -> None:
    offer = Offer("vast", "5001", "RTX 4090", 1, 24.6, "Texas, US", 0.42, 0.18, True, False)
    cfg = box("vast", key, mirror="s3://bucket/lenslab", boot_timeout_minutes=0.5)
    vast.drop_create_replies = 1
    provider = vast_provider(vast)
    got = provider.launch_offer(cfg, offer)
    assert len(vast.instances) == 1
    provider.terminate(got)
    vast.stuck_starting = True
    with pytest.raises(BootFailed, match="still starting after 30 s; lenslab terminated it"):
        provider.launch_offer(cfg, offer)
    assert not vast.instances


def test_vast_no_capacity_and_no_credit(vast: VastEmulator, key: Path) -> None:
    cfg = box("vast", key, mirror="s3://bucket/lenslab")
    gone = Offer("vast", "5999", "RTX 4090", 1, 24.6, "", 0.42, 0.18, True, False)
    with pytest.raises(CloudNoCapacity, match="no longer available"):
        vast_provider(vast).launch_offer(cfg, gone)
    vast.credit = 0.1
    offer = Offer("vast", "5001", "RTX 4090", 1, 24.6, "", 0.42, 0.18, True, False)
    with pytest.raises(CloudOutOfFunds, match="lacks credit"):
        vast_provider(vast).launch_offer(cfg, offer)
    assert not vast.instances
