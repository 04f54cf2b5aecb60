"""Calls that spend or create, with their replies lost on the way back (or the request lost on
the way in): never a second instance, file system or key, and `terminate` always ends with
nothing left. Real HTTP through the flaky proxy to the stateful emulator."""

from __future__ import annotations

import pytest

from lenslab.errors import LambdaError, OutcomeUnknown
from lenslab.providers.lambda_cloud import launch
from lenslab.providers.lambda_cloud.api import LambdaClient
from lenslab.providers.lambda_cloud.launch import (
    LaunchPlan,
    ensure_file_system,
    ensure_ssh_key,
    execute_plan,
    launch_instance,
    plan_launch,
    terminate_all,
)
from tests.support.flaky_proxy import FlakyProxy
from tests.support.lambda_emulator import LambdaEmulator

PUBLIC_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHh0ZXN0a2V5 me@laptop"
LAUNCH = "/api/v1/instance-operations/launch"
TERMINATE = "/api/v1/instance-operations/terminate"
LOST = ["502", "reset", "timeout"]


def no_sleep(seconds: float) -> None:
    pass


@pytest.fixture
def api(emulator: LambdaEmulator, proxy: FlakyProxy) -> LambdaClient:
    # A short timeout: the proxy's "timeout" fault holds the reply until the client gives up.
    return LambdaClient(emulator.api_key, base_url=proxy.url, sleep=no_sleep, timeout=1.0)


def launched(emulator: LambdaEmulator) -> int:
    return sum(1 for method, path, _ in emulator.requests if (method, path) == ("POST", LAUNCH))


def ready_plan(api: LambdaClient) -> LaunchPlan:
    plan = plan_launch(api, "box", "proj", ["A100"], None, PUBLIC_KEY)
    ensure_ssh_key(api, plan.ssh_key_name, PUBLIC_KEY)
    ensure_file_system(api, plan.file_system, plan.offer.region)
    return plan


@pytest.mark.parametrize("how", LOST)
def test_lost_launch_reply_finds_the_instance_instead_of_launching_again(
    emulator: LambdaEmulator, proxy: FlakyProxy, api: LambdaClient, how: str
) -> None:
    plan = ready_plan(api)
    proxy.fail("POST", LAUNCH, how)
    instance_id = launch_instance(api, plan, no_sleep)
    assert list(emulator.instances) == [instance_id]
    assert emulator.instances[instance_id]["name"] == "lenslab-box"
    assert launched(emulator) == 1
    assert proxy.applied == [("POST", LAUNCH, how, True)]


@pytest.mark.parametrize("how", LOST)
def test_launch_lost_on_the_way_in_is_sent_again_once(
    emulator: LambdaEmulator, proxy: FlakyProxy, api: LambdaClient, how: str
) -> None:
    plan = ready_plan(api)
    proxy.fail("POST", LAUNCH, how, forward=False)
    instance_id = launch_instance(api, plan, no_sleep)
    assert list(emulator.instances) == [instance_id]
    assert launched(emulator) == 1


def test_a_launch_that_never_arrives_gives_up_and_says_nothing_bills(
    emulator: LambdaEmulator, proxy: FlakyProxy, api: LambdaClient
) -> None:
    plan = ready_plan(api)
    proxy.fail("POST", LAUNCH, "502", times=10, forward=False)
    with pytest.raises(OutcomeUnknown) as info:
        launch_instance(api, plan, no_sleep)
    assert str(info.value) == (
        "Lambda Cloud API POST /instance-operations/launch: no usable reply (HTTP 502); no instance named "
        "lenslab-box appeared, so none is billing; check your network connection and try again"
    )
    assert len(proxy.applied) == launch.LAUNCH_ATTEMPTS
    assert emulator.instances == {}


def test_garbled_launch_reply_finds_the_instance(
    emulator: LambdaEmulator, proxy: FlakyProxy, api: LambdaClient
) -> None:
    plan = ready_plan(api)
    proxy.fail("POST", LAUNCH, "replace", content_type="text/html", body=b"<html>ok</html>")
    instance_id = launch_instance(api, plan, no_sleep)
    assert list(emulator.instances) == [instance_id]


def test_garbled_launch_reply_with_no_instance_is_not_sent_again(
    emulator: LambdaEmulator, proxy: FlakyProxy, api: LambdaClient
) -> None:
    plan = ready_plan(api)
    proxy.fail("POST", LAUNCH, "replace", forward=False, body=b'{"data": {"instance_ids": []}}')
    with pytest.raises(OutcomeUnknown) as info:
        launch_instance(api, plan, no_sleep)
    assert str(info.value).startswith(
        "Lambda Cloud API POST /instance-operations/launch: unexpected reply (data.instance_ids: 0 ids instead of "
        "one); no instance named lenslab-box appeared, so none is billing; "
    )
    assert len(proxy.applied) == 1 and emulator.instances == {}


@pytest.mark.parametrize("how", LOST)
def test_lost_terminate_reply_still_ends_with_nothing(
    emulator: LambdaEmulator, proxy: FlakyProxy, api: LambdaClient, how: str
) -> None:
    instance_id = launch_instance(api, ready_plan(api), no_sleep)
    proxy.fail("POST", TERMINATE, how, times=2)
    assert terminate_all(api, "lenslab-box") == [instance_id]
    assert emulator.instances == {}
    assert terminate_all(api, "lenslab-box") == []  # again: nothing to do, no error


def test_terminate_sees_every_state_and_every_copy(emulator: LambdaEmulator, api: LambdaClient) -> None:
    plan = ready_plan(api)
    first = launch_instance(api, plan, no_sleep)
    second = launch_instance(api, plan, no_sleep)  # as an older lenslab could leave behind
    emulator.instances[first]["status"] = "unhealthy"
    assert sorted(terminate_all(api, "lenslab-box")) == sorted([first, second])
    assert emulator.instances == {}


@pytest.mark.parametrize("how", LOST)
@pytest.mark.parametrize("forward", [True, False])
def test_lost_file_system_reply_makes_exactly_one(
    emulator: LambdaEmulator, proxy: FlakyProxy, api: LambdaClient, how: str, forward: bool
) -> None:
    proxy.fail("POST", "/api/v1/filesystems", how, forward=forward)
    fs = ensure_file_system(api, "lenslab-proj", "us-east-1")
    assert [f["name"] for f in emulator.file_systems.values()] == ["lenslab-proj"]
    assert fs.name == "lenslab-proj" and fs.region == "us-east-1"


@pytest.mark.parametrize("how", LOST)
def test_lost_ssh_key_reply_registers_one_key(
    emulator: LambdaEmulator, proxy: FlakyProxy, api: LambdaClient, how: str
) -> None:
    proxy.fail("POST", "/api/v1/ssh-keys", how)
    ensure_ssh_key(api, "lenslab-box", PUBLIC_KEY)
    assert [k["name"] for k in emulator.ssh_keys.values()] == ["lenslab-box"]


def test_every_reply_lost_once_still_makes_one_of_each(
    emulator: LambdaEmulator, proxy: FlakyProxy, api: LambdaClient
) -> None:
    for method, path, how in [
        ("POST", "/api/v1/ssh-keys", "reset"),
        ("POST", "/api/v1/filesystems", "timeout"),
        ("POST", LAUNCH, "502"),
        ("GET", "/api/v1/instances/[0-9a-f]+", "reset"),
        ("GET", "/api/v1/instances", "502"),
    ]:
        proxy.fail(method, path, how)
    plan = plan_launch(api, "box", "proj", ["A100"], None, PUBLIC_KEY)
    instance, _ = execute_plan(api, plan, PUBLIC_KEY, boot_timeout=5, sleep=no_sleep)
    assert instance.status == "active" and list(emulator.instances) == [instance.id]
    assert len(emulator.file_systems) == 1 and len(emulator.ssh_keys) == 1
    assert launched(emulator) == 1
    assert len(proxy.applied) == 5


def test_a_launch_refused_with_429_is_sent_again_at_once(emulator: LambdaEmulator, api: LambdaClient) -> None:
    # A 429 is refused before anything happens: safe to repeat without looking first.
    plan = ready_plan(api)
    emulator.inject(429, "global/too-many-requests", "slow down", times=2, path_prefix="/instance-operations/launch")
    before = len(emulator.requests)
    instance_id = launch_instance(api, plan, no_sleep)
    assert list(emulator.instances) == [instance_id]
    assert [p for _, p, _ in emulator.requests[before:]] == ["/api/v1" + "/instance-operations/launch"] * 3


def test_a_key_of_the_same_name_that_is_not_ours_is_refused(emulator: LambdaEmulator, api: LambdaClient) -> None:
    api.add_ssh_key("lenslab-box", "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG90aGVyLWtleQ other@laptop")
    with pytest.raises(LambdaError) as info:
        ensure_ssh_key(api, "lenslab-box", PUBLIC_KEY)
    assert "An SSH key with this name already exists" in str(info.value)
