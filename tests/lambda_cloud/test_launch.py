"""Choosing an offer and launching against the emulator: reuse, capacity, regions, deadlines."""

from __future__ import annotations

import pytest

from lenslab.errors import ProviderError
from lenslab.providers.lambda_cloud.api import InsufficientCapacity, LambdaClient
from lenslab.providers.lambda_cloud.launch import execute_plan, find_instance, plan_launch
from tests.support.lambda_emulator import LambdaEmulator

PUBLIC_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHh0ZXN0a2V5 me@laptop"


@pytest.fixture
def cloud(emulator: LambdaEmulator) -> LambdaEmulator:
    return emulator  # conftest's emulator, under the name these tests read best with


@pytest.fixture
def lambda_(cloud: LambdaEmulator) -> LambdaClient:
    return LambdaClient(cloud.api_key, base_url=cloud.url, sleep=lambda s: None)


class FakeClock:
    """Advances only when the code under test sleeps, so deadlines are tested instantly."""

    def __init__(self) -> None:
        self.now = 0.0

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def __call__(self) -> float:
        return self.now


def test_first_preference_with_capacity_wins(lambda_: LambdaClient) -> None:
    plan = plan_launch(lambda_, "box", "proj", ["H100", "A100", "A10"], None, PUBLIC_KEY)
    assert (plan.offer.instance_type.name, plan.offer.region) == ("gpu_1x_a100_sxm4", "us-east-1")
    assert plan.offer.dollars_per_hour == 1.29
    assert plan.create_file_system and plan.register_ssh_key
    assert plan.file_system == "lenslab-proj" and plan.name == "lenslab-box"


def test_capacity_only_in_a_second_region(cloud: LambdaEmulator, lambda_: LambdaClient) -> None:
    cloud.types["gpu_1x_a100_sxm4"].regions_with_capacity = {"europe-central-1", "us-west-1"}
    plan = plan_launch(lambda_, "box", "proj", ["A100"], ["us-east-1", "us-west-1"], PUBLIC_KEY)
    assert plan.offer.region == "us-west-1"


def test_existing_file_system_pins_the_region(cloud: LambdaEmulator, lambda_: LambdaClient) -> None:
    lambda_.create_file_system("lenslab-proj", "us-west-1")
    cloud.types["gpu_1x_a100_sxm4"].regions_with_capacity = {"us-east-1", "us-west-1"}
    plan = plan_launch(lambda_, "box", "proj", ["A100"], None, PUBLIC_KEY)
    assert plan.offer.region == "us-west-1" and not plan.create_file_system


def test_no_capacity_where_the_file_system_lives(cloud: LambdaEmulator, lambda_: LambdaClient) -> None:
    lambda_.create_file_system("lenslab-proj", "us-west-1")
    with pytest.raises(InsufficientCapacity) as info:
        plan_launch(lambda_, "box", "proj", ["A100"], None, PUBLIC_KEY)
    assert str(info.value) == (
        "Lambda Cloud has no capacity for A100 in region us-west-1 (where your file system is) right now "
        "(capacity exists in: us-east-1, us-west-1); add GPU types to box.gpu_types, allow more regions in "
        "box.regions, or try again in a few minutes"
    )


def test_launch_registers_key_creates_file_system_and_is_reusable(cloud: LambdaEmulator, lambda_: LambdaClient) -> None:
    plan = plan_launch(lambda_, "box", "proj", ["A100"], None, PUBLIC_KEY)
    instance, fs = execute_plan(lambda_, plan, PUBLIC_KEY, boot_timeout=5)
    assert instance.status == "active" and fs.name == "lenslab-proj"
    assert [k.name for k in lambda_.ssh_keys()] == ["lenslab-box"]
    assert (cloud.fs_root / "lenslab-proj").is_dir()
    assert find_instance(lambda_, "lenslab-box") == lambda_.instance(instance.id)
    again = plan_launch(lambda_, "box", "proj", ["A100"], None, PUBLIC_KEY)
    assert not again.register_ssh_key and not again.create_file_system


@pytest.mark.parametrize(
    ("knob", "reason"), [("stuck_booting", "was still booting after 900 s"), ("unhealthy_after_boot", "went unhealthy")]
)
def test_failed_boot_is_terminated(cloud: LambdaEmulator, lambda_: LambdaClient, knob: str, reason: str) -> None:
    setattr(cloud, knob, True)
    clock = FakeClock()
    plan = plan_launch(lambda_, "box", "proj", ["A100"], None, PUBLIC_KEY)
    with pytest.raises(ProviderError) as info:
        execute_plan(lambda_, plan, PUBLIC_KEY, sleep=clock.sleep, clock=clock)
    assert str(info.value) == (
        f"instance lenslab-box {reason}; lenslab terminated it so it does not bill; run `lenslab up` again "
        "(another instance is launched), or choose another GPU type or region"
    )
    assert lambda_.instances() == []
    # The file system outlives the failed instance.
    assert [fs.name for fs in lambda_.file_systems()] == ["lenslab-proj"]
