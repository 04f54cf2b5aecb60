"""A box the watcher moves to another provider: where it lives now (found by every command
through ``provider_for``), its spending carried along, and the choice of the cheapest offer
across providers, made only when the runs are mirrored. Real files; the providers' APIs are
stand-ins that answer with real ``Offer`` and ``Instance`` records."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from lenslab_testkit import NoRuns

from lenslab import config
from lenslab.config import BoxConfig
from lenslab.providers import container_ledger as ledgers
from lenslab.providers import placement
from lenslab.providers.base import provider_for
from lenslab.providers.offers import RUNNING, CloudNoCapacity, Instance, Offer
from lenslab.watch import events, relocate
from lenslab.watch import state as states
from lenslab.watch.state import RECOVERING, WATCHING, WatchState
from lenslab.watch.watcher import Watcher

MIRROR = "s3://bucket/lenslab"


@pytest.fixture(autouse=True)
def no_xdg(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)


def box(**fields: Any) -> BoxConfig:
    base: dict[str, Any] = {"name": "b", "provider": "runpod", "budget_usd": 100.0, "gpu_types": ["4090"],
                            "interruptible": True}  # fmt: skip
    return BoxConfig(**{**base, **fields})


def test_every_command_finds_the_box_where_it_was_moved() -> None:
    cfg = box()
    assert provider_for(cfg).name == "runpod"
    placement.move(cfg, "vast")
    assert provider_for(cfg).name == "vast" and placement.where(cfg) == "vast"
    assert placement.path("b").stat().st_mode & 0o777 == 0o600
    placement.move(cfg, "runpod")  # back where lenslab.toml says: no record left
    assert not placement.path("b").exists() and provider_for(cfg).name == "runpod"
    placement.path("b").write_text('{"provider": "nowhere"}')  # not a provider: ignored
    assert provider_for(cfg).name == "runpod"
    placement.path("b").write_text("{not json")
    assert provider_for(cfg).name == "runpod"
    placement.path("b").write_text("[]")  # not a record
    assert provider_for(cfg).name == "runpod"


def test_a_record_made_under_another_lenslab_toml_is_ignored_and_forget_removes_it() -> None:
    placement.move(box(), "vast")
    # The user has since named another provider in lenslab.toml: that choice wins.
    assert placement.where(box(provider="vast")) == "vast" and placement.moved_to(box(provider="vast")) is None
    assert provider_for(box(provider="lambda", interruptible=False)).name == "lambda"
    assert provider_for(box()).name == "vast"  # the lenslab.toml it was made under still finds it
    placement.forget(box())
    assert not placement.path("b").exists() and provider_for(box()).name == "runpod"
    placement.forget(box())  # nothing to forget: fine


def test_moving_carries_what_the_box_spent_into_the_new_ledger() -> None:
    ledgers.write("runpod", "b", ledgers.Ledger("p1", 0.5, "4090", "EU", launched_at=None, spent_usd=1.25))
    ledgers.write("vast", "b", ledgers.Ledger(spent_usd=0.75))  # an earlier stay there
    relocate.carry_spending("b", "runpod", "vast")
    assert ledgers.read("vast", "b").spent_usd == 2.0 and not ledgers.read("vast", "b").instance_id
    assert ledgers.read("runpod", "b") == ledgers.Ledger()
    (ended,) = events.read("b")  # the instance still in the old ledger was closed, and said so
    assert (ended["kind"], ended["provider"], ended["instance"]) == ("ended", "runpod", "p1")


class Cloud:
    """One provider's API as the watcher uses it: its offers, and the instance it launched."""

    capabilities = SimpleNamespace(stop_resume=False)

    def __init__(self, name: str, bid: float, capacity: bool = True) -> None:
        self.name, self.capacity = name, capacity
        self.offer = Offer(name, f"{name}-4090", "RTX 4090", 1, 24, "", 2 * bid, bid, True, name == "runpod")
        self.live: Instance | None = None
        self.launched: list[str] = []

    def offers(self, query: object) -> list[Offer]:
        return [self.offer]

    def current(self, cfg: BoxConfig) -> Instance | None:
        return self.live

    def get(self, cfg: BoxConfig) -> Instance | None:
        return self.live

    def terminate(self, instance: Instance) -> None:
        self.live = None

    def launch(self, cfg: BoxConfig) -> None:
        self.launch_offer(cfg, self.offer)

    def launch_offer(self, cfg: BoxConfig, offer: Offer) -> None:
        if not self.capacity:
            raise CloudNoCapacity(f"no {self.name} capacity")
        assert placement.where(cfg) == self.name, "launched before the move was written down"
        self.launched.append(offer.offer_id)
        self.live = Instance(self.name, f"{self.name}-{len(self.launched)}", "lenslab-b", RUNNING, "RUNNING", True,
                             "RTX 4090", 1, offer.price_interruptible, "127.0.0.1", 2222)  # fmt: skip


def lost_box(cfg: BoxConfig, clouds: list[Cloud], monkeypatch: pytest.MonkeyPatch) -> tuple[Watcher, list[str]]:
    """A watcher of a box on clouds[0] whose instance was just terminated by the provider."""
    monkeypatch.setattr(relocate, "candidates", lambda _: clouds)
    said: list[str] = []
    states.save(WatchState(box="b", provider=clouds[0].name, instance="p0", last_reachable=1.0))
    w = Watcher(config.Config(box=cfg, path=Path("l.toml")), clouds[0], NoRuns(), say=said.append,  # type: ignore[arg-type]
                sleep=lambda _: None, reachable=lambda host, port: True)  # fmt: skip
    return w, said


def test_a_mirrored_box_is_relaunched_on_the_cheapest_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    runpod, vast = Cloud("runpod", 0.29), Cloud("vast", 0.18)
    w, said = lost_box(box(mirror=MIRROR), [runpod, vast], monkeypatch)
    assert w.tick() == WATCHING
    assert (runpod.launched, vast.launched) == ([], ["vast-4090"])
    assert w.provider is vast and states.load("b", "x").instance == "vast-1"
    assert json_provider() == "vast" and provider_for(box()).name == "vast"
    kinds = [(e["kind"], e.get("provider")) for e in events.read("b")]
    assert kinds == [("preempted", "runpod"), ("moved", "vast"), ("relaunched", "vast")], kinds
    assert not any("stays on" in line for line in said)


def test_a_move_terminates_what_is_left_on_the_old_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    runpod, vast = Cloud("runpod", 0.29), Cloud("vast", 0.18)
    w, _ = lost_box(box(mirror=MIRROR), [runpod, vast], monkeypatch)
    runpod.launch(box())  # an instance a failed relaunch left behind, still billing on runpod
    w._move(vast)  # type: ignore[arg-type]
    assert runpod.live is None and w.provider is vast and placement.where(box()) == "vast"


def test_the_cheapest_on_the_same_provider_keeps_the_box_there(monkeypatch: pytest.MonkeyPatch) -> None:
    runpod, vast = Cloud("runpod", 0.18), Cloud("vast", 0.29)
    w, _ = lost_box(box(mirror=MIRROR), [runpod, vast], monkeypatch)
    assert w.tick() == WATCHING
    assert (runpod.launched, vast.launched) == (["runpod-4090"], [])
    assert not placement.path("b").exists()


def test_without_a_mirror_the_box_stays_and_says_so_once(monkeypatch: pytest.MonkeyPatch) -> None:
    runpod, vast = Cloud("runpod", 0.29, capacity=False), Cloud("vast", 0.18)
    w, said = lost_box(box(), [runpod, vast], monkeypatch)
    assert w.tick() == RECOVERING and w.tick() == RECOVERING  # no runpod capacity: tried again
    runpod.capacity = True
    assert w.tick() == WATCHING
    assert (runpod.launched, vast.launched) == (["runpod-4090"], [])
    staying = [line for line in said if "box.mirror is not set" in line]
    assert staying == ["box.mirror is not set, so the box stays on runpod, where its runs are "
                       "(set box.mirror to let it move to vast when cheaper)"]  # fmt: skip
    assert not placement.path("b").exists()


def json_provider() -> str:
    import json

    return str(json.loads(placement.path("b").read_text())["provider"])


def test_spending_a_broken_off_move_left_behind_is_carried_when_a_watcher_starts() -> None:
    # The move wrote the new home (vast), then the watcher was killed before carrying the money.
    placement.move(box(), "vast")
    ledgers.write("runpod", "b", ledgers.Ledger(spent_usd=1.5))
    ledgers.write("vast", "b", ledgers.Ledger(spent_usd=0.25))
    relocate.settle_spending("b", "vast")
    assert ledgers.read("vast", "b").spent_usd == 1.75 and ledgers.read("runpod", "b") == ledgers.Ledger()
    relocate.settle_spending("b", "vast")  # once only
    assert ledgers.read("vast", "b").spent_usd == 1.75
    # A ledger whose instance may still run is left to the watcher that owns it, not merged.
    ledgers.write("runpod", "b", ledgers.Ledger("p9", 0.5, "4090", "EU", launched_at=None, spent_usd=2.0))
    relocate.settle_spending("b", "vast")
    assert ledgers.read("runpod", "b").spent_usd == 2.0 and ledgers.read("vast", "b").spent_usd == 1.75
