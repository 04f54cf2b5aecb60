"""What `lenslab runs` and `lenslab status` show of the event log: recent preemptions and
recoveries, and (`lenslab runs --cost`) what each run cost so far against on-demand prices.

Cost is the box's instances' billed time, as the ledger counts it: each instance from its
``launched`` event to its ``ended`` one (or now), at the price it was rented at; a run is charged
for the instance time between its first and last sight (runs that share a box share its cost,
each shown in full). The on-demand figure is the same hours at each offer's on-demand price.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from lenslab.watch import events

RECENT = 5


def recent(box_name: str, limit: int = RECENT) -> list[dict[str, Any]]:
    """The newest preemptions and recoveries, oldest first."""
    return events.recoveries(box_name)[-limit:]


def lines(found: Any, prefix: str = "  ") -> list[str]:
    """One line per event, for the text output; nothing when there is none."""
    if not isinstance(found, list) or not found:
        return []
    return [f"{prefix}preemptions and recoveries (newest last):"] + [
        f"{prefix}  {events.describe(e)}" for e in found if isinstance(e, dict)
    ]


@dataclass(frozen=True)
class Segment:
    instance: str
    start: float
    end: float | None  # None: still billing
    price: float
    on_demand: float | None
    interruptible: bool


def segments(box_name: str) -> list[Segment]:
    """Each instance's billed time, from the log's ``launched`` and ``ended`` events."""
    found: dict[str, Segment] = {}
    for e in events.read(box_name):
        instance = str(e.get("instance") or "")
        if e["kind"] == "launched" and instance:
            on_demand = e.get("on_demand")
            found[instance] = Segment(instance, float(e["time"]), None, float(e.get("price") or 0.0),
                                      float(on_demand) if isinstance(on_demand, (int, float)) else None,
                                      bool(e.get("interruptible")))  # fmt: skip
        elif e["kind"] == "ended" and instance in found and found[instance].end is None:
            old = found[instance]
            found[instance] = Segment(old.instance, old.start, float(e["time"]), old.price, old.on_demand,
                                      old.interruptible)  # fmt: skip
    return list(found.values())


def run_cost(box_name: str, start: float, end: float | None = None) -> dict[str, Any]:
    """Hours, cost and on-demand cost of the box's instances between ``start`` and ``end``."""
    until = end if end is not None else time.time()
    hours = cost = on_demand = 0.0
    for seg in segments(box_name):
        overlap = max(0.0, min(seg.end if seg.end is not None else time.time(), until) - max(seg.start, start)) / 3600
        hours += overlap
        cost += overlap * seg.price
        on_demand += overlap * (seg.on_demand if seg.on_demand is not None else seg.price)
    return {"hours": round(hours, 4), "cost_usd": round(cost, 4), "on_demand_usd": round(on_demand, 4)}


def run_window(box_name: str, status: dict[str, Any]) -> tuple[float, float | None]:
    """When a run began (its first mention in the log, else its status's start) and ended."""
    name = status.get("name")
    mentioned = [float(e["time"]) for e in events.read(box_name) if name in (e.get("runs") or [])]
    started = status.get("started_at")
    candidates = [*mentioned, *([float(started)] if isinstance(started, (int, float)) else [])]
    start = min(candidates) if candidates else time.time()
    done = status.get("state") in ("finished", "failed")
    updated = status.get("updated_at")
    return start, (float(updated) if done and isinstance(updated, (int, float)) else None)


def cost_rows(box_name: str, statuses: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for status in statuses:
        start, end = run_window(box_name, status)
        rows.append({"run": status.get("name"), **run_cost(box_name, start, end)})
    return rows
