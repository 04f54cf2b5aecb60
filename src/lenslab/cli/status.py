"""``lenslab status``: is the box reachable, and what does it have."""

from __future__ import annotations

import argparse
from typing import Any

from lenslab.cli.common import add_command, emit, load_config


def status(args: argparse.Namespace) -> int:
    """Show whether the box is reachable, its GPUs, driver, disk, root usage and uptime.

    Exits 0 when the box answers, 3 when it cannot be reached (the reason is in the output).

    Example:
      lenslab status
      lenslab status --json | jq .gpus
    """
    from lenslab.errors import ProviderError, RemoteError
    from lenslab.providers.base import provider_for
    from lenslab.remote import autostop, labs
    from lenslab.watch import report

    cfg = load_config(args)
    provider = provider_for(cfg.box)
    recoveries = report.recent(cfg.box.name)  # preemptions and recoveries (`lenslab watch`)
    # get, not launch: asking about a cloud box must never start one.
    box = provider.get(cfg.box)
    if box is None:
        data: dict[str, Any] = {"box": cfg.box.name, "provider": provider.name, "running": False,
                                "recoveries": recoveries}  # fmt: skip
        emit(args, data, "\n".join([f"box {cfg.box.name}: not running (`lenslab up` starts it)",
                                    *report.lines(recoveries)]))  # fmt: skip
        return 0
    data = {"box": box.name, "provider": box.provider, "alias": box.alias, "recoveries": recoveries}
    if provider.capabilities.cost:
        data["cost"] = _with_budget(provider.cost(box.name), cfg.box.budget_usd)
    if provider.capabilities.rents_machines:
        # Every instance lenslab has for this box that is not terminated: all of them bill.
        data["instances"] = provider.instances_seen()
    try:
        # One try: status answers "is it up?", it does not wait for a booting box.
        runner = provider.connect(box, attempts=1)
        try:
            facts, watcher = labs.box_facts(cfg.box, provider, runner, box)
        finally:
            runner.close()
    except (RemoteError, ProviderError) as exc:
        # ProviderError: a cloud instance that has no IP address yet.
        data.update(reachable=False, error=str(exc))
        emit(args, data, f"box {box.name}: unreachable: {exc}" + _instances_text(data, "\n  "))
        return RemoteError.exit_code
    # The laptop's own fields last: nothing the box printed can stand in for them.
    data.update({key: value for key, value in facts.items() if key not in data})
    data.update(reachable=True, autostop=watcher, autostop_text=autostop.describe(watcher))
    rented = provider.capabilities.rents_machines
    if rented and cfg.box.autostop == "laptop" and watcher and watcher.get("acted"):
        # The box found itself idle but holds no key to stop itself: the laptop does it.
        provider.terminate(box)
        data["terminated"] = True
        data["autostop_text"] += "; lenslab terminated the idle instance"
    emit(args, data, _text(data))
    return 0


BUDGET_WARN_FRACTION = 0.8


def _with_budget(cost: dict[str, Any] | None, budget: float | None) -> dict[str, Any] | None:
    if cost is None or budget is None or cost["cost_usd"] is None:
        return cost
    used = cost["cost_usd"] / budget
    warning = None
    if used >= BUDGET_WARN_FRACTION:
        warning = f"{used:.0%} of budget_usd ${budget:.2f} spent; `lenslab down` stops the billing"
    return {**cost, "budget_usd": budget, "budget_used_fraction": round(used, 3), "budget_warning": warning}


def _cost_line(cost: dict[str, Any]) -> str:
    line = f"cost:   ${cost['price_per_hour_usd']:.2f}/hour ({cost['instance_type']}, {cost['region']})"
    if cost["cost_usd"] is not None:
        line += f", {cost['billed_hours']:.2f} h so far = ${cost['cost_usd']:.2f}"
    else:
        line += ", launched elsewhere: hours so far unknown"
    if cost.get("budget_warning"):
        line += f"\n  warning: {cost['budget_warning']}"
    return line


def _text(d: dict[str, Any]) -> str:
    from lenslab.watch import report

    gpus = d.get("gpus") or []
    gpu_text = ", ".join(_gpu_text(g) for g in gpus)
    used = d.get("root_used_kb")
    free, total = d.get("disk_free_kb"), d.get("disk_total_kb")
    disk = f"{_gib(free)} free of {_gib(total)}" if free is not None and total is not None else "unknown"
    return "\n".join(
        [
            f"box {d['box']} ({d['provider']}): reachable, up "
            + (_duration(d["uptime_s"]) if isinstance(d.get("uptime_s"), int) else "unknown"),
            f"  gpus:   {gpu_text or 'none'}" + (f"  driver {d['driver']}" if d.get("driver") else ""),
            f"  disk:   {disk}",
            f"  root:   {d.get('root', '?')}"
            + (f" ({_gib(used)} used)" if used is not None else "" if d.get("root_exists") else " (missing)"),
        ]
        + _lab_lines(d)
        + ([f"  {_cost_line(d['cost'])}"] if d.get("cost") else [])
        + [f"  autostop: {d.get('autostop_text', 'unknown')}"]
        + report.lines(d.get("recoveries"))
    ) + _instances_text(d, "\n  ")


def _lab_lines(d: dict[str, Any]) -> list[str]:
    """What runs the lab: the containers, or a cluster's batch scheduler, partitions and nodes."""
    scheduler = d.get("scheduler")
    if not isinstance(scheduler, dict):
        return [f"  containers: {d['containers'] if d.get('containers') is not None else 'docker unavailable'}"]
    parts = ", ".join(f"{p['name']}{'*' if p['default'] else ''} ({p['nodes']} nodes, {p['state']})"
                      for p in scheduler["partitions"])  # fmt: skip
    nodes = ", ".join(f"{n['name']} {n['state']}" for n in scheduler["nodes"])
    return [f"  {scheduler['name']}: partitions {parts or 'none'}", f"  nodes:  {nodes or 'none'}"]


def _gpu_text(gpu: dict[str, Any]) -> str:
    memory, util = gpu.get("memory_mib"), gpu.get("utilization_pct")
    return f"{gpu.get('name', '?')} ({'?' if memory is None else memory} MiB, {'?' if util is None else util}%)"


def _instances_text(d: dict[str, Any], prefix: str) -> str:
    """A line only when something needs attention: more than one instance, or one not active."""
    instances = d.get("instances") or []
    if len(instances) <= 1 and all(i["status"] == "active" for i in instances):
        return ""
    listed = ", ".join(f"{i['id']} {i['status']} (${i['price_per_hour_usd']:.2f}/hour)" for i in instances)
    return f"{prefix}instances: {listed}; `lenslab down` terminates them all"


def _gib(kb: int) -> str:
    return f"{kb / 1024 / 1024:.1f} GiB"


def _duration(seconds: int) -> str:
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    return f"{days}d {hours}h {rest // 60}m" if days else f"{hours}h {rest // 60}m"


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    add_command(commands, "status", status)
