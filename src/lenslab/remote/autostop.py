"""Install the autostop watcher (provision/autostop.py) on a box, and read what it decided.

Which boxes get one: ``lambda`` boxes unless ``autostop = "off"``; ``ssh`` boxes only with
``autostop_poweroff = true`` (it powers the machine off); ``local`` never. For a lambda box
with ``autostop = "box"`` the watcher terminates the instance itself, so the API key is stored
on the box, readable by root only; ``autostop = "laptop"`` keeps the key off the box: the
watcher then only checkpoints and records that the box is idle, and the next ``lenslab status``
or ``lenslab up`` on the laptop terminates it.
"""

from __future__ import annotations

import json
import shlex
import time
from typing import Any

from lenslab.config import BoxConfig
from lenslab.records import Box
from lenslab.remote.bootstrap import Runner, run_script, script

STATE_FILE = "/var/lib/lenslab/autostop.json"
GPU_UTIL_THRESHOLD_PCT = 5
MAX_CHECK_SECONDS = 60.0


def watcher_config(
    cfg: BoxConfig, box: Box, launch: dict[str, Any] | None, api_url: str | None
) -> dict[str, Any] | None:
    """The watcher's settings for this box, or None when it gets no watcher."""
    if box.provider == "local" or cfg.autostop == "off":
        return None
    if box.provider == "ssh" and not cfg.autostop_poweroff:
        return None
    idle_seconds = cfg.idle_minutes * 60
    settings: dict[str, Any] = {
        "idle_minutes": cfg.idle_minutes,
        "check_every_seconds": min(MAX_CHECK_SECONDS, max(idle_seconds / 4, 0.2)),
        "ssh_ports": sorted({22, box.port}),
        "gpu_util_threshold": GPU_UTIL_THRESHOLD_PCT,
        "jupyter_url": f"http://127.0.0.1:{cfg.jupyter_port}",
        # This box's containers; only its dev container carries the Jupyter token.
        "dev_label": f"lenslab.box={box.name}",
        "state_file": STATE_FILE,
        "action": "poweroff" if box.provider == "ssh" else "none",
    }
    if box.provider == "lambda" and launch is not None:
        settings.update(
            lambda_instance_id=launch["instance_id"],
            price_cents_per_hour=launch["price_cents_per_hour"],
        )
        if "launched_at" in launch:
            settings.update(launched_at=launch["launched_at"], budget_usd=cfg.budget_usd)
        if cfg.autostop == "box":
            settings.update(action="lambda-terminate", lambda_api_url=api_url,
                            lambda_key_file="/etc/lenslab/lambda-api-key")  # fmt: skip
    return settings


def install(runner: Runner, settings: dict[str, Any], api_key: str | None) -> dict[str, Any]:
    """Stage the files in a private temp dir (the key travels on stdin, never on a command line),
    then let provision/install-autostop.sh put them in place as root."""
    stage = runner.run("mktemp -d", check=True).stdout.strip()
    quoted = shlex.quote(stage)
    runner.run(f"cat > {quoted}/autostop.py", stdin=script("autostop.py"), check=True)
    runner.run(f"cat > {quoted}/autostop.json", stdin=json.dumps(settings).encode(), check=True)
    if settings["action"] == "lambda-terminate" and api_key:
        runner.run(f"umask 077 && cat > {quoted}/lambda-api-key", stdin=api_key.encode(), check=True)
    result: dict[str, Any] = run_script(runner, "install-autostop.sh", {"STAGE": stage}, sudo=True)
    return result


def read_state(runner: Runner) -> dict[str, Any] | None:
    out = runner.run(f"cat {STATE_FILE} 2>/dev/null")
    try:
        state: dict[str, Any] = json.loads(out.stdout)
        return state
    except ValueError:
        return None


def describe(state: dict[str, Any] | None, now: float | None = None) -> str:
    if state is None:
        return "off"
    if state.get("acted"):
        return f"acted: {state['acted']}"
    if state.get("busy"):
        return f"not idle ({', '.join(state['busy'])})"
    left = max(0.0, state["stop_at"] - (now or time.time()))
    return f"idle; stops in {left / 60:.0f} min"
