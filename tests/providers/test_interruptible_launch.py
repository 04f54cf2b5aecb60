"""Interruptible (spot / bid) boxes: the [box] settings, the launch each cloud is sent, the
fallback when no interruptible offer is within max_price_per_hour, and resuming a preempted
instance through the API. Over real HTTP against the stateful emulators (records only)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lenslab import config
from lenslab.errors import ConfigError
from lenslab.providers import container_ledger
from lenslab.providers.offers import PREEMPTED, RUNNING, CloudNoCapacity, Offer
from tests.providers.test_container_launch import Clock, box, runpod_provider, vast_provider
from tests.support.runpod_emulator import RunPodEmulator
from tests.support.vast_emulator import VastEmulator


def write_box(tmp_path: Path, lines: str) -> Path:
    target = tmp_path / "lenslab.toml"
    target.write_text(f'[box]\nname = "t"\n{lines}\n')
    return target


@pytest.mark.parametrize(
    ("lines", "words"),
    [
        ('provider = "lambda"\ninterruptible = true', "lambda has no interruptible instances"),
        ('provider = "runpod"\nfallback = "spot"', "fallback: Input should be 'on-demand' or 'wait'"),
        ('provider = "runpod"\nresume_wait_minutes = -1', "resume_wait_minutes: Input should be greater than"),
        ('provider = "vast"\ninterruptible = "yes"', "interruptible: Input should be a valid boolean"),
    ],
)
def test_bad_interruptible_settings_are_one_line(tmp_path: Path, lines: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words) as raised:
        config.load(write_box(tmp_path, lines))
    assert "\n" not in str(raised.value) and str(raised.value).startswith(str(tmp_path))


def test_interruptible_settings_load(tmp_path: Path) -> None:
    lines = "\n".join(
        ['provider = "runpod"', "interruptible = true", 'fallback = "wait"', "resume_wait_minutes = 3",
         "max_price_per_hour = 0.5"]
    )  # fmt: skip
    got = config.load(write_box(tmp_path, lines)).box
    assert (got.interruptible, got.fallback, got.resume_wait_minutes, got.max_price_per_hour) == (True, "wait", 3, 0.5)


def test_runpod_interruptible_rents_a_spot_pod_at_the_minimum_bid(runpod: RunPodEmulator, key: Path) -> None:
    provider, asked = runpod_provider(runpod)
    cfg = box("runpod", key, gpu_types=["4090"], interruptible=True)
    got = provider.launch(cfg)
    assert asked[0].startswith("launch 1x RTX 4090 (24 GB) on runpod in EU-RO-1 at interruptible, bidding $0.29/hour")
    (pod,) = runpod.pods.values()
    assert (pod["podType"], pod["_bid"], pod["costPerHr"]) == ("INTERRUPTABLE", 0.29, 0.29)
    assert pod["_spec"]["networkVolumeId"] and pod["_spec"]["volumeMountPath"] == "/lab"
    ledger = container_ledger.read("runpod", "t")
    assert (ledger.interruptible, ledger.price_per_hour, ledger.on_demand_price) == (True, 0.29, 0.69)
    # Preempted: RunPod keeps the exited spot pod; lenslab bids it back (podBidResume).
    runpod.preempt(pod["id"])
    lost = provider.current(cfg)
    assert lost is not None and (lost.id, lost.state) == (pod["id"], PREEMPTED)
    provider.resume(cfg, lost)
    back = provider.current(cfg)
    assert back is not None and (back.id, back.state) == (pod["id"], RUNNING) and len(runpod.created) == 1
    provider.terminate(got)


def test_runpod_fallback_on_demand_when_the_bid_is_over_the_limit(runpod: RunPodEmulator, key: Path) -> None:
    provider, _ = runpod_provider(runpod)
    runpod.gpus["NVIDIA GeForce RTX 4090"].min_bid = 0.75  # above max_price_per_hour, on demand is below
    cfg = box("runpod", key, gpu_types=["4090"], interruptible=True, max_price_per_hour=0.7)
    got = provider.launch(cfg)
    (pod,) = runpod.pods.values()
    assert (pod["podType"], pod["costPerHr"]) == ("RESERVED", 0.69)
    assert container_ledger.read("runpod", "t").interruptible is False
    provider.terminate(got)


def test_runpod_fallback_wait_waits_for_an_interruptible_offer(runpod: RunPodEmulator, key: Path) -> None:
    clock = Clock()
    provider, _ = runpod_provider(runpod, clock=clock)
    gpu = runpod.gpus["NVIDIA GeForce RTX 4090"]
    gpu.min_bid = 0.75
    cfg = box("runpod", key, gpu_types=["4090"], interruptible=True, max_price_per_hour=0.5, fallback="wait",
              resume_wait_minutes=2)  # fmt: skip
    with pytest.raises(CloudNoCapacity, match=r"no runpod interruptible offer of box\.gpu_types"):
        provider.launch(cfg)
    assert not runpod.pods and sum(clock.sleeps) >= 120  # it waited, and took no on-demand pod

    def cheaper_later(seconds: float) -> None:
        clock.sleep(seconds)
        gpu.min_bid = 0.3  # the spot price falls while it waits

    provider.sleep = cheaper_later
    got = provider.launch(cfg)
    (pod,) = runpod.pods.values()
    assert (pod["podType"], pod["costPerHr"]) == ("INTERRUPTABLE", 0.3)
    provider.terminate(got)


def test_vast_interruptible_bids_the_min_bid_and_a_new_bid_resumes_it(vast: VastEmulator, key: Path) -> None:
    provider = vast_provider(vast)
    cfg = box("vast", key, mirror="s3://bucket/lenslab", gpu_types=["4090"], interruptible=True)
    got = provider.launch(cfg)
    (row,) = vast.instances.values()
    assert (row["_body"]["price"], row["is_bid"], row["dph_total"]) == (0.18, True, 0.18)
    vast.preempt(row["id"])  # outbid
    lost = provider.current(cfg)
    assert lost is not None and lost.state == PREEMPTED
    provider.resume(cfg, lost)
    back = provider.current(cfg)
    assert back is not None and (back.id, back.state) == (str(row["id"]), RUNNING) and len(vast.created) == 1
    provider.terminate(got)


def test_up_cheapest_takes_the_interruptible_price(runpod: RunPodEmulator, key: Path) -> None:
    from lenslab.cli.offers import cheapest_match, matches_box

    provider, _ = runpod_provider(runpod)
    spot = box("runpod", key, gpu_types=["A100", "4090"], interruptible=True, max_price_per_hour=0.5)
    assert cheapest_match(spot, provider).gpu_name == "RTX 4090"  # A100's bid 0.82 is over the limit
    pricey = Offer("runpod", "x", "A100 PCIe", 1, 80, "", 0.45, 0.6, True, True)
    waiting = box("runpod", key, gpu_types=["A100"], interruptible=True, max_price_per_hour=0.5, fallback="wait")
    assert not matches_box(pricey, waiting) and matches_box(
        pricey, box("runpod", key, gpu_types=["A100"], interruptible=True, max_price_per_hour=0.5)
    )
