"""What the laptop asks of the box besides runs: its facts (``lenslab status``, ``lenslab up``)
and a Jupyter server on its loopback interface."""

from __future__ import annotations

import contextlib
import os
import platform
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lenslab.contract import RUNS_DIR, STATUS_FILE, is_run_name
from lenslab_workspace.box import placement, supervisor
from lenslab_workspace.box.layout import BoxError, alive, read_json, state_dir, write_json

DU_SECONDS = 0.3
JUPYTER_FILE = "jupyter.json"
JUPYTER_TOKEN_FILE = "jupyter-token"
JUPYTER_MARKER = "jupyter"
JUPYTER_START_SECONDS = 60.0
# Unprivileged ports only: Jupyter runs as the box's user.
JUPYTER_PORTS = range(1024, 65536)
# The autostop watcher's state (lenslab's remote/autostop.py names them): a VM's, else a
# container box's under the persistent root. ``facts`` carries it, so that `lenslab status`
# needs one exec on the box, not two.
AUTOSTOP_STATE_FILES = (Path("/var/lib/lenslab/autostop.json"), Path("autostop-state.json"))


def gpus() -> tuple[list[dict[str, Any]], str | None]:
    """nvidia-smi's GPUs (name, memory, utilization) and driver; none without a working one."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return [], None
    query = [smi, "--query-gpu=name,memory.total,utilization.gpu,driver_version", "--format=csv,noheader,nounits"]
    try:
        out = subprocess.run(query, capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return [], None
    found, driver = [], None
    for line in out.splitlines()[:64]:
        parts = [part.strip() for part in line.split(",")]
        if len(parts) == 4:
            found.append({"name": parts[0][:200], "memory_mib": _int(parts[1]), "utilization_pct": _int(parts[2])})
            driver = parts[3][:200]
    return found, driver


def _int(text: str) -> int | None:
    return int(text) if text.isdigit() else None


def _used_kb(root: Path) -> int | None:
    """The root's usage, or None when a huge tree would take longer than ``DU_SECONDS``."""
    deadline, total = time.monotonic() + DU_SECONDS, 0
    for base, _dirs, names in os.walk(root):
        if time.monotonic() > deadline:
            return None
        for name in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(base, name)).st_blocks * 512
    return total // 1024


def uptime_seconds() -> int | None:
    """How long this box (for a container: its first process) has been up."""
    try:
        machine = float(Path("/proc/uptime").read_text().split()[0])
        started = int(Path("/proc/1/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None
    return max(0, int(machine - started / os.sysconf("SC_CLK_TCK")))


def facts(root: Path) -> dict[str, Any]:
    """The shape provision/status.sh prints; ``containers`` counts the live supervised runs."""
    found, driver = gpus()
    exists = root.is_dir()
    total = free = None
    if exists:
        usage = shutil.disk_usage(root)
        total, free = usage.total // 1024, usage.free // 1024
    live = sum(1 for name, state in supervisor.states(root).items() if supervisor.is_alive(state, name))
    return {"root": str(root), "root_exists": exists, "root_used_kb": _used_kb(root) if exists else None,
            "disk_total_kb": total, "disk_free_kb": free, "gpus": found, "driver": driver,
            "uptime_s": uptime_seconds(), "containers": live, "autostop": autostop_state(root)}  # fmt: skip


def autostop_state(root: Path) -> dict[str, Any] | None:
    """The watcher's state as it wrote it (the laptop checks it); None when it has none."""
    vm_file, container_file = AUTOSTOP_STATE_FILES
    for path in (vm_file, state_dir(root) / container_file):
        state = read_json(path)
        if state is not None:
            return state if isinstance(state, dict) else None
    return None


def os_release() -> tuple[str, str]:
    fields: dict[str, str] = {}
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            key, _, value = line.partition("=")
            fields[key] = value.strip().strip('"')
    except OSError:
        pass
    return fields.get("ID", platform.system().lower()), fields.get("VERSION_ID", "")


def prepare_summary(root: Path, changed: list[str]) -> dict[str, Any]:
    """The shape of bootstrap.sh's summary, for `lenslab up` on a box without Docker."""
    found, driver = gpus()
    name, version = os_release()
    return {
        "os": name,
        "os_version": version,
        "gpus": [{"name": g["name"], "memory_mib": g["memory_mib"] or 0} for g in found],
        "driver": driver,
        "docker": "none",
        "docker_access": "none",
        "root": str(root),
        "disk_free_gb": round(shutil.disk_usage(root).free / 1024**3, 1),
        "changed": changed,
        "warnings": [],
    }


def runs(root: Path) -> list[dict[str, Any]]:
    """Every run under runs/ with its status.json (as written) and its supervisor's facts."""
    out = []
    for path in sorted((root / RUNS_DIR).iterdir()) if (root / RUNS_DIR).is_dir() else []:
        name = path.name
        state = supervisor.read_state(root, name)
        status = read_json(path / STATUS_FILE)
        if not is_run_name(name) or (status is None and not state):
            continue
        live = supervisor.is_alive(state, name)
        facts = None
        if state:
            facts = {
                "alive": live,
                "phase": state.get("phase") if live else "exited",
                "desired": state.get("desired"),
                "restarts": state.get("restarts"),
                "last_exit_code": state.get("last_exit_code"),
                "launched_at": state.get("launched_at"),
                "trainer_pid": state.get("trainer_pid") if live else None,
            }
        # Which GPU the live launch uses, or that it waits for one; None without GPUs.
        gpu = placement.recorded(root, name, state.get("supervisor_pid")) if live else None
        out.append({"name": name, "status": status, "supervisor": facts, "gpu": gpu})
    return out


def jupyter(root: Path, port: int) -> dict[str, Any]:
    """A Jupyter server on 127.0.0.1 (started when none runs); its port and token.

    A port some other process already listens on is not Jupyter's: the token must not go
    there, so a new server takes a free port instead."""
    if port not in JUPYTER_PORTS:
        raise BoxError(f"--port {port} is not a port Jupyter can use: pick one from 1024 to 65535", 2)
    where = state_dir(root)
    where.mkdir(parents=True, exist_ok=True)
    token_file = where / JUPYTER_TOKEN_FILE
    if not token_file.is_file():
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(24))
    os.chmod(token_file, 0o600)
    token = token_file.read_text().strip()
    known = read_json(where / JUPYTER_FILE)
    if isinstance(known, dict) and isinstance(known.get("port"), int) and _ours(known.get("pid"), known["port"]):
        return {"port": known["port"], "token": token, "started": False}
    if _listening(port):
        port = _free_port()
    with open(where / "jupyter.log", "ab") as log:
        env = {**os.environ, "JUPYTER_TOKEN": token}
        child = subprocess.Popen(jupyter_command(root, port), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                 start_new_session=True, env=env, cwd=root)  # fmt: skip
    write_json(where / JUPYTER_FILE, {"pid": child.pid, "port": port})
    deadline = time.monotonic() + JUPYTER_START_SECONDS
    while not listens(child.pid, port):
        if child.poll() is not None:
            raise BoxError(f"jupyter exited at once ({child.returncode}); see {where / 'jupyter.log'}")
        if time.monotonic() > deadline:
            raise BoxError(f"jupyter did not listen on 127.0.0.1:{port} within {JUPYTER_START_SECONDS:.0f}s")
        time.sleep(0.2)
    return {"port": port, "token": token, "started": True}


def jupyter_command(root: Path, port: int) -> list[str]:
    # Beside this Python (lenslab's image), else on PATH: in a venv made on a stock image with
    # --system-site-packages, Jupyter is the image's own.
    beside = Path(sys.executable).with_name("jupyter")
    # Else JupyterLab as a module of this Python: a venv on a cluster's shared root sees the
    # cluster Python's packages but not its scripts' directory.
    found = str(beside) if beside.exists() else shutil.which("jupyter")
    lab = [found, "lab"] if found else [sys.executable, "-m", "jupyterlab"]
    command = [*lab, "--no-browser", "--ip=127.0.0.1",
               f"--port={port}", "--ServerApp.port_retries=0", f"--ServerApp.root_dir={root}"]  # fmt: skip
    # A stock image's box user is root, and Jupyter Server refuses to start as root unless told.
    return [*command, "--ServerApp.allow_root=True"] if os.geteuid() == 0 else command


def _ours(pid: object, port: int) -> bool:
    return alive(pid, JUPYTER_MARKER) and isinstance(pid, int) and listens(pid, port)


def listens(pid: int, port: int) -> bool:
    """Whether process ``pid`` itself holds the socket listening on 127.0.0.1:``port``."""
    inodes = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if len(fields) > 9 and fields[1] == f"0100007F:{port:04X}" and fields[3] == "0A":
                inodes.add(f"socket:[{fields[9]}]")
    if not inodes:
        return False
    try:
        return any(os.readlink(fd) in inodes for fd in Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False


def _free_port() -> int:
    """A port nothing listens on now (the kernel's pick); Jupyter fails rather than move on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0
