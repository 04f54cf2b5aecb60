"""Install the autostop watcher (provision/autostop.py) on a box, and read what it decided.

Which boxes get one is the provider's ``capabilities.autostop``: "watch" boxes unless
``autostop = "off"``; "poweroff" boxes only with ``autostop_poweroff = true`` (it powers the
machine off); "none" never. The watcher counts
authenticated SSH sessions (VSCode's included), this box's training containers, GPU use and busy
Jupyter kernels; after ``idle_minutes`` without any, or once ``budget_usd`` is spent, it stops
training gracefully and acts. For a cloud box with ``autostop = "box"`` it terminates the
instance itself (how: the provider's ``autostop_inputs``), so the API key is stored on the box:
readable by root only on a VM, by the box user on a container box (``lenslab down`` removes it
from a volume that outlives the instance); ``autostop =
"laptop"`` keeps the key off the box: the watcher then only checkpoints and records that the box
is idle, and the next ``lenslab status`` on the laptop terminates it.

A container box (RunPod, vast.ai: no root, no systemd) runs the watcher as a child of
``lenslab-box serve``, as the box user; ``install_in_container`` writes its settings and the key
(mode 600) under ``<root>/.lenslab/`` on the persistent volume, where the watcher reads them at
every check. Its state lives there too (``CONTAINER_STATE``).
"""

from __future__ import annotations

import json
import shlex
import time
from typing import Any

from lenslab import values
from lenslab.config import BoxConfig
from lenslab.contract import BOX_LABEL
from lenslab.records import Box
from lenslab.remote.bootstrap import Runner, run_script, script

STATE_FILE = "/var/lib/lenslab/autostop.json"
# On a container box, under the persistent root: the settings (the file lenslab-box serve's
# watcher reads), its state, and the key when the box stops itself.
CONTAINER_SETTINGS = ".lenslab/autostop.json"
CONTAINER_STATE = ".lenslab/autostop-state.json"
CONTAINER_DIR = ".lenslab"
# A container box's settings at create time, in the instance's environment: its watcher uses
# them until the laptop writes the settings file (provision/autostop.py: ENV_SETTINGS).
ENV_SETTINGS = "LENSLAB_AUTOSTOP"
OFF = {"off": True}  # the settings file of a box with autostop = "off": create-time ones no longer apply
GPU_UTIL_THRESHOLD_PCT = 5
MAX_CHECK_SECONDS = 60.0


def watcher_config(cfg: BoxConfig, box: Box, kind: str, extra: dict[str, Any]) -> dict[str, Any] | None:
    """The watcher's settings for this box, or None when it gets no watcher. ``kind`` is the
    provider's ``capabilities.autostop``; ``extra`` its ``autostop_inputs`` settings."""
    return settings_for(cfg, box.name, kind, extra)


def settings_for(cfg: BoxConfig, box_name: str, kind: str, extra: dict[str, Any]) -> dict[str, Any] | None:
    """``watcher_config`` by the box's name: before the box exists (a container's create)."""
    if kind == "none" or cfg.autostop == "off":
        return None
    if kind == "poweroff" and not cfg.autostop_poweroff:
        return None
    idle_seconds = cfg.idle_minutes * 60
    settings: dict[str, Any] = {
        "idle_minutes": cfg.idle_minutes,
        "check_every_seconds": min(MAX_CHECK_SECONDS, max(idle_seconds / 4, 0.2)),
        "gpu_util_threshold": GPU_UTIL_THRESHOLD_PCT,
        "jupyter_url": f"http://127.0.0.1:{cfg.jupyter_port}",
        # This box's containers (an engine may hold others'); only its dev container carries
        # the Jupyter token.
        "dev_label": f"{BOX_LABEL}={box_name}",
        "box_label": f"{BOX_LABEL}={box_name}",
        "state_file": STATE_FILE,
        "action": "poweroff" if kind == "poweroff" else "none",
    }
    settings.update(extra)
    return settings


def install(
    runner: Runner, settings: dict[str, Any], api_key: str | None, key_name: str | None = None
) -> dict[str, Any]:
    """Stage the files in a private temp dir (the key travels on stdin, never on a command line),
    then let provision/install-autostop.sh put them in place as root."""
    stage = runner.run("mktemp -d", check=True).stdout.strip()
    quoted = shlex.quote(stage)
    runner.run(f"cat > {quoted}/autostop.py", stdin=script("autostop.py"), check=True)
    runner.run(f"cat > {quoted}/autostop.json", stdin=json.dumps(settings).encode(), check=True)
    if api_key and key_name:  # only a box that stops itself through the API gets a key
        runner.run(f"umask 077 && cat > {quoted}/{shlex.quote(key_name)}", stdin=api_key.encode(), check=True)
    result: dict[str, Any] = run_script(runner, "install-autostop.sh", {"STAGE": stage}, sudo=True)
    return result


def install_in_container(
    runner: Runner, root: str, settings: dict[str, Any] | None, api_key: str | None, key_name: str | None
) -> dict[str, Any]:
    """Write the watcher's settings (None: no watcher, so its settings go) and the key on a
    container box, as the box user: the key travels on stdin and is created mode 600
    (``umask 077``), never world-readable, not even for a moment."""
    base = root.rstrip("/") or "/"
    where, settings_file = f"{base}/{CONTAINER_DIR}", f"{base}/{CONTAINER_SETTINGS}"
    key_file = f"{where}/{key_name}" if key_name else None
    if settings is None:
        # Settings first: without them the watcher does nothing, with or without a key; its old
        # state would tell `lenslab status` of a watcher that no longer watches. "off" is
        # written, not just the file removed: else the settings given at create time would apply.
        gone = " ".join(shlex.quote(f) for f in (key_file, f"{base}/{CONTAINER_STATE}") if f)
        runner.run(f"rm -f {gone}", check=True)
        _write_private(runner, settings_file, json.dumps(OFF).encode())
        return {"autostop": "off"}
    settings = in_container(settings, base)
    if api_key and key_file:
        _write_private(runner, key_file, api_key.encode())
        settings["key_file"] = key_file
    elif key_file:
        runner.run(f"rm -f {shlex.quote(key_file)}", check=True)  # a key stays only while it is used
    _write_private(runner, settings_file, json.dumps(settings).encode())
    return {"autostop": "lenslab-box serve", "action": settings.get("action", "none")}


def in_container(settings: dict[str, Any], root: str) -> dict[str, Any]:
    """``settings`` with what a container box's watcher needs besides: where its state goes,
    how it stops runs, where the Jupyter token is (all under the persistent ``root``)."""
    base = root.rstrip("/") or "/"
    return {
        **settings,
        "state_file": f"{base}/{CONTAINER_STATE}",
        "box_command": ["lenslab-box", "--root", base],
        "jupyter_token_file": f"{base}/{CONTAINER_DIR}/jupyter-token",
    }


def _write_private(runner: Runner, path: str, data: bytes) -> None:
    """Replace ``path`` atomically with ``data`` (from stdin), mode 600 from its creation."""
    quoted, tmp = shlex.quote(path), shlex.quote(f"{path}.tmp")
    runner.run(f'umask 077 && mkdir -p "$(dirname {quoted})" && cat > {tmp} && mv -f {tmp} {quoted}', stdin=data,
               check=True)  # fmt: skip


def read_state(runner: Runner) -> dict[str, Any] | None:
    """The watcher's state: a VM's, else a container box's (under its persistent root)."""
    container = f'"${{LENSLAB_ROOT:-/lab}}"/{CONTAINER_STATE}'
    out = runner.run(f"cat {STATE_FILE} 2>/dev/null || cat {container} 2>/dev/null")
    try:
        state = json.loads(out.stdout)
    except ValueError:
        return None
    return state if isinstance(state, dict) else None  # anything else is no state lenslab wrote


def _printable(text: str) -> str:
    """``text`` with control characters escaped: the box's state file is printed on the laptop."""
    return "".join(ch if values.bad_char(ch) is None else ascii(ch)[1:-1] for ch in text)


def describe(state: dict[str, Any] | None, now: float | None = None) -> str:
    if state is None:
        return "off"
    if state.get("acted"):
        return _printable(f"acted: {state['acted']}")
    if state.get("busy"):
        busy = state["busy"]
        return _printable(f"not idle ({', '.join(map(str, busy)) if isinstance(busy, list) else busy})")
    stop_at = state.get("stop_at")
    if not isinstance(stop_at, (int, float)) or isinstance(stop_at, bool):
        return "on; its state file holds no stop time"
    left = max(0.0, stop_at - (now or time.time()))
    return f"idle; stops in {left / 60:.0f} min"
