"""The Lambda Cloud client against the stateful emulator, over real HTTP on loopback."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lenslab.providers.lambda_cloud import api
from lenslab.providers.lambda_cloud.api import (
    AccountInactive,
    FileSystemInUse,
    FileSystemInWrongRegion,
    InsufficientCapacity,
    InvalidApiKey,
    LambdaClient,
    LambdaError,
    ObjectDoesNotExist,
    QuotaExceeded,
)
from tests.support.lambda_emulator import LambdaEmulator

PUBLIC_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHh0ZXN0a2V5 lenslab"


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[LambdaEmulator]:
    emulator = LambdaEmulator(tmp_path / "filesystems").start()
    emulator.launch_interval = 0.0
    yield emulator
    emulator.stop()


class Sleeps:
    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


def client(cloud: LambdaEmulator, sleep: Sleeps | None = None, key: str | None = None) -> LambdaClient:
    return LambdaClient(key or cloud.api_key, base_url=cloud.url, sleep=sleep or Sleeps())


def test_instance_types_with_prices_and_capacity(cloud: LambdaEmulator) -> None:
    types = client(cloud).instance_types()
    a100 = types["gpu_1x_a100_sxm4"]
    assert a100.price_cents_per_hour == 129
    assert a100.regions_with_capacity == ("us-east-1",)
    assert types["gpu_1x_h100_pcie"].regions_with_capacity == ()


def test_launch_boot_and_terminate(cloud: LambdaEmulator) -> None:
    lambda_ = client(cloud)
    lambda_.add_ssh_key("lenslab", PUBLIC_KEY)
    fs = lambda_.create_file_system("lenslab-proj", "us-east-1")
    instance_id = lambda_.launch("us-east-1", "gpu_1x_a100_sxm4", "lenslab", [fs.name], "lenslab-box")
    instance = lambda_.instance(instance_id)
    assert instance.status == "active" and instance.region == "us-east-1"
    assert instance.file_system_names == ("lenslab-proj",)
    assert [i.id for i in lambda_.instances()] == [instance_id]
    with pytest.raises(FileSystemInUse) as in_use:
        lambda_.delete_file_system(fs.id)
    assert str(in_use.value) == (
        "Lambda Cloud: File system is in use by an instance (filesystems/filesystem-in-use); "
        "terminate the instance that uses it first (`lenslab down`), then try again"
    )
    assert [i.status for i in lambda_.terminate([instance_id])] == ["terminated"]
    assert lambda_.instances() == []
    with pytest.raises(ObjectDoesNotExist):
        lambda_.instance(instance_id)
    lambda_.delete_file_system(fs.id)
    assert lambda_.file_systems() == []


@pytest.mark.parametrize(
    ("setup", "error", "code"),
    [
        (lambda c: None, InsufficientCapacity, "instance-operations/launch/insufficient-capacity"),
        (lambda c: setattr(c, "quota", 0), QuotaExceeded, "global/quota-exceeded"),
        (lambda c: setattr(c, "account_active", False), AccountInactive, "global/account-inactive"),
    ],
)
def test_launch_errors_are_mapped(cloud: LambdaEmulator, setup: object, error: type[LambdaError], code: str) -> None:
    lambda_ = client(cloud)
    lambda_.add_ssh_key("lenslab", PUBLIC_KEY)
    assert callable(setup)
    setup(cloud)
    region = "us-west-1" if error is InsufficientCapacity else "us-east-1"
    with pytest.raises(error) as info:
        lambda_.launch(region, "gpu_1x_a100_sxm4", "lenslab", [], "x")
    assert info.value.code == code
    assert "\n" not in str(info.value)


def test_file_system_in_another_region(cloud: LambdaEmulator) -> None:
    lambda_ = client(cloud)
    lambda_.add_ssh_key("lenslab", PUBLIC_KEY)
    lambda_.create_file_system("lenslab-proj", "us-west-1")
    with pytest.raises(FileSystemInWrongRegion) as info:
        lambda_.launch("us-east-1", "gpu_1x_a100_sxm4", "lenslab", ["lenslab-proj"], "x")
    assert str(info.value).startswith("Lambda Cloud: File system is in a different region than the instance")


def test_invalid_key_never_echoes_the_key(cloud: LambdaEmulator) -> None:
    wrong = "sk-wrong-key-should-not-appear-9876"
    lambda_ = client(cloud, key=wrong)
    with pytest.raises(InvalidApiKey) as info:
        lambda_.instances()
    assert str(info.value) == (
        "Lambda Cloud: API key was invalid, expired, or deleted (global/invalid-api-key); "
        "set LAMBDA_API_KEY (or the key file) to a valid key from https://cloud.lambda.ai/api-keys"
    )
    assert wrong not in str(info.value) and wrong not in repr(lambda_) and wrong not in repr(info.value)


def test_429_storm_is_retried_with_backoff(cloud: LambdaEmulator) -> None:
    sleeps = Sleeps()
    cloud.inject(429, "global/too-many-requests", "slow down", times=4)
    assert client(cloud, sleeps).instances() == []
    assert sleeps.calls == [1.0, 2.0, 4.0, 8.0]


def test_provider_errors_and_5xx_are_transient(cloud: LambdaEmulator) -> None:
    sleeps = Sleeps()
    cloud.inject(500, "provider/internal-unavailable", "provider down", times=1)
    cloud.inject(503, "", "unavailable", times=1)
    assert client(cloud, sleeps).ssh_keys() == []
    assert len(sleeps.calls) == 2


def test_retries_end_after_max_attempts(cloud: LambdaEmulator) -> None:
    cloud.inject(429, "global/too-many-requests", "slow down", times=api.MAX_ATTEMPTS)
    with pytest.raises(LambdaError) as info:
        client(cloud).instances()
    assert "slow down" in str(info.value)


def test_non_transient_errors_are_not_retried(cloud: LambdaEmulator) -> None:
    sleeps = Sleeps()
    with pytest.raises(ObjectDoesNotExist):
        client(cloud, sleeps).instance("nope")
    assert sleeps.calls == []


def test_launches_are_spaced_by_the_rate_limit(cloud: LambdaEmulator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api, "LAUNCH_MIN_INTERVAL_SECONDS", 0.5)
    cloud.launch_interval = 0.5
    cloud.quota = 5
    lambda_ = LambdaClient(cloud.api_key, base_url=cloud.url)
    lambda_.add_ssh_key("lenslab", PUBLIC_KEY)
    start = time.monotonic()
    for _ in range(2):
        lambda_.launch("us-east-1", "gpu_1x_a100_sxm4", "lenslab", [], "x")
    assert time.monotonic() - start >= 0.5
    assert len(lambda_.instances()) == 2  # neither launch met the emulator's 429


def test_unreachable_api(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    sleeps = Sleeps()
    lambda_ = LambdaClient("k", base_url=f"http://127.0.0.1:{port}/api/v1", sleep=sleeps)
    with pytest.raises(LambdaError) as info:
        lambda_.instances()
    assert str(info.value) == (
        "Lambda Cloud API did not answer (ConnectError); check your network connection and try again"
    )
    assert len(sleeps.calls) == api.MAX_ATTEMPTS - 1


def test_every_documented_error_code_is_mapped() -> None:
    documented = {
        "instance-operations/launch/insufficient-capacity",
        "instance-operations/launch/file-system-in-wrong-region",
        "global/quota-exceeded",
        "global/invalid-api-key",
        "global/account-inactive",
        "global/object-does-not-exist",
        "filesystems/filesystem-in-use",
    }
    assert documented <= set(api.ERROR_CODES)
    assert all(cls is not LambdaError for cls, _ in api.ERROR_CODES.values())
