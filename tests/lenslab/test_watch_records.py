"""The watcher's records on the laptop: the event log, cost per run against on-demand prices,
what `lenslab status` shows of it, the state file, and `lenslab watch`'s one-line refusals."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from lenslab_testkit import lenslab

from lenslab.watch import events, report
from lenslab.watch import state as states
from lenslab.watch.state import WatchedRun, WatchState


@pytest.fixture(autouse=True)
def no_xdg(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)


def test_event_log_skips_a_torn_last_line_and_describes_each_event(home: Path) -> None:
    events.record("b", "preempted", provider="runpod", instance="p1", state="preempted (EXITED)",
                  steps={"r": 120}, cost_usd=0.42)  # fmt: skip
    with events.path("b").open("a") as log:
        log.write('{"time": 1, "kind": "resu')  # a watcher killed mid-write
    (only,) = events.read("b")
    line = events.describe(only)
    assert "preempted  on runpod p1  (preempted (EXITED))  at r step 120  cost so far $0.42" in line
    assert events.path("b").stat().st_mode & 0o077 == 0


def test_cost_per_run_counts_each_instance_at_its_price_and_on_demand(home: Path) -> None:
    now = time.time()
    lines = [
        {"time": now - 7200, "kind": "launched", "instance": "a", "price": 0.29, "on_demand": 0.69},
        {"time": now - 3600, "kind": "ended", "instance": "a"},
        {"time": now - 3600, "kind": "launched", "instance": "b", "price": 0.18, "on_demand": 0.42},
    ]  # fmt: skip
    events.path("b").parent.mkdir(parents=True, exist_ok=True)
    events.path("b").write_text("".join(json.dumps(e) + "\n" for e in lines))
    (row,) = report.cost_rows("b", [{"name": "r", "state": "running", "started_at": now - 7200}])
    assert row["run"] == "r" and row["hours"] == pytest.approx(2.0, abs=0.01)
    assert row["cost_usd"] == pytest.approx(0.47, abs=0.01)  # 1 h at 0.29 + 1 h at 0.18
    assert row["on_demand_usd"] == pytest.approx(1.11, abs=0.01)  # the same hours at 0.69 and 0.42
    # A run that finished an hour ago is charged only up to then.
    (done,) = report.cost_rows("b", [{"name": "d", "state": "finished", "started_at": now - 7200,
                                      "updated_at": now - 3600}])  # fmt: skip
    assert done["cost_usd"] == pytest.approx(0.29, abs=0.01)


def test_state_file_round_trips_and_a_broken_one_starts_afresh(home: Path) -> None:
    st = WatchState(box="b", provider="runpod", phase="recovering", instance="p1", preempted_at=5.0,
                    runs=[WatchedRun("r", "/x/r.toml", 40)])  # fmt: skip
    states.save(st)
    assert states.load("b", "runpod") == st
    states.path("b").write_text("{not json")
    assert states.load("b", "runpod") == WatchState(box="b", provider="runpod")


def test_one_watcher_per_box(home: Path) -> None:
    held = states.take_lock("p")
    try:
        assert states.is_locked("p") and states.read_pid("p") is not None
        with pytest.raises(states.AlreadyWatching, match="a watcher for box p is already running"):
            states.take_lock("p")
    finally:
        held.close()
    assert not states.is_locked("p")


@pytest.mark.parametrize(
    ("toml", "args", "words"),
    [
        ('provider = "local"', ["watch"], "lenslab watch keeps cloud boxes rented by the hour going; box t is local"),
        ('provider = "runpod"', ["watch", "--poll-seconds", "0"], "'0' is not a number of seconds from 0.1 to 600"),
        ('provider = "runpod"', ["watch", "--stop"], None),
    ],
)
def test_watch_refuses_in_one_line(home: Path, tmp_path: Path, toml: str, args: list[str], words: str | None) -> None:
    (tmp_path / "lenslab.toml").write_text(f'[box]\nname = "t"\n{toml}\n')
    result = lenslab(*args, env={"LENSLAB_CONFIG": str(tmp_path / "lenslab.toml")})
    assert "Traceback" not in result.stderr
    if words is None:  # --stop with no watcher running says so, and succeeds
        assert (result.returncode, result.stdout.strip()) == (0, "no watcher is running")
        return
    assert result.returncode != 0 and words in result.stderr and len(result.stderr.strip().splitlines()) <= 2


def test_status_lines_show_recent_recoveries(home: Path) -> None:
    events.record("b", "launched", instance="x", price=0.3)  # not a recovery: not shown
    events.record("b", "preempted", provider="vast", instance="900001", state="preempted (running/exited)")
    events.record("b", "resumed", provider="vast", instance="900001", cost_usd=0.1)
    shown = report.lines(report.recent("b"))
    assert shown[0] == "  preemptions and recoveries (newest last):"
    assert [s.split("  ")[3] for s in shown[1:]] == ["preempted", "resumed"]
