"""The per-box event log on the laptop: every launch, preemption, recovery and budget stop.

One JSON object per line in ``<state dir>/events/<box>.jsonl`` (``$XDG_STATE_HOME/lenslab``,
else ``~/.local/state/lenslab``), appended and flushed one line at a time, so a process killed
mid-write leaves at most one torn last line, which ``read`` skips. ``lenslab runs`` and
``lenslab status`` show the preemptions and recoveries; ``lenslab runs --cost`` sums the
instances' segments (``launched`` to ``ended``) into cost per run and the on-demand equivalent.

Kinds: ``launched`` (instance, provider, gpu, region, price, on_demand, interruptible),
``ended`` (instance: terminated, so it stopped billing), ``preempted`` (instance, state, step),
``moved`` (relaunched on another provider: ``provider`` is the new one), ``resumed`` (instance:
the same one came back), ``relaunched`` (a new instance took over),
``restarted`` (runs restarted, with their steps), ``budget`` (budget reached: nothing more is
launched), ``finished`` (every watched run finished).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


def state_dir() -> Path:
    """lenslab's state directory (XDG base directories; a relative value is ignored)."""
    xdg = os.environ.get("XDG_STATE_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".local" / "state"
    return base / "lenslab"


def path(box_name: str) -> Path:
    return state_dir() / "events" / f"{box_name}.jsonl"


def record(box_name: str, kind: str, **fields: Any) -> dict[str, Any]:
    """Append one event (with the time) and return it; a failure to write never stops the caller's
    work (a full disk must not leave an instance unterminated), it only loses the record."""
    event = {"time": round(time.time(), 3), "kind": kind, **fields}
    target = path(box_name)
    try:
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a") as handle:
            handle.write(json.dumps(event, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
    except OSError:
        pass
    return event


def read(box_name: str) -> list[dict[str, Any]]:
    """Every event, oldest first; lines that are not whole JSON objects are skipped."""
    try:
        lines = path(box_name).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        whole = isinstance(event, dict) and isinstance(event.get("kind"), str)
        if whole and isinstance(event.get("time"), (int, float)):
            found.append(event)
    return found


def recoveries(box_name: str) -> list[dict[str, Any]]:
    """The preemptions and what followed them, for `lenslab runs` and `status`."""
    kinds = {"preempted", "moved", "resumed", "relaunched", "restarted", "budget", "finished"}
    return [e for e in read(box_name) if e["kind"] in kinds]


def describe(event: dict[str, Any]) -> str:
    """One line for a person: when, what, where, at which step, cost so far."""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(event["time"])))
    where = " ".join(str(event[k]) for k in ("provider", "instance") if event.get(k))
    parts = [when, str(event["kind"])]
    if where:
        parts.append(f"on {where}")
    if event.get("state"):
        parts.append(f"({event['state']})")
    steps = event.get("steps")
    if isinstance(steps, dict) and steps:
        parts.append("at " + ", ".join(f"{run} step {step}" for run, step in sorted(steps.items())))
    if event.get("reason"):
        parts.append(f"- {event['reason']}")
    if isinstance(event.get("cost_usd"), (int, float)):
        parts.append(f"cost so far ${float(event['cost_usd']):.2f}")
    return "  ".join(parts)
