"""What the box says about its runs, checked before anything on the laptop uses it.

The box is not trusted: a run directory may be named anything, a ``status.json`` may hold
anything, a container label may carry anything. So the listing travels base64-framed (a name
with a newline cannot split a record), run names must match ``lenslab.contract.RUN_NAME`` in
full (other entries are skipped), a status must name its own directory, and only the fields
lenslab shows are kept, each with its type checked and text made one printable line.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import shlex
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from lenslab.contract import BOX_LABEL, GPU_FILE, GPU_UUID, ROLE_LABEL, RUN_LABEL, STATUS_FILE, is_run_name
from lenslab.remote.engine import engine_errors

if TYPE_CHECKING:
    import docker

    from lenslab.remote.bootstrap import Runner

# A status.json is a few hundred bytes; anything much larger is not lenslab-train's.
MAX_STATUS_BYTES = 65536
LOG_TAIL_LINES = 15
MAX_TEXT = 300
MAX_NUMBER = 10**18
STATES = ("starting", "running", "finished", "interrupted", "failed")
_NUMBERS = ("step", "tokens_done", "tokens_total", "tokens_per_second", "eta_seconds", "resumed_from_step",
            "started_at", "updated_at")  # fmt: skip
MAX_GPU_INDEX = 63
_DOCKER_TIME = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?Z")
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f]+")


def text(value: object, limit: int = MAX_TEXT) -> str:
    """One printable line: control characters (newlines, terminal escapes) become spaces."""
    return _UNPRINTABLE.sub(" ", str(value))[:limit]


def _number(value: object) -> int | float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None  # a bool is an int to Python, never a count to lenslab
    # Bounded, so arithmetic on it (progress, ages) can neither overflow nor print nonsense.
    return value if abs(value) <= MAX_NUMBER else None  # NaN fails the comparison too


def clean_status(raw: object, name: str) -> dict[str, Any] | None:
    """The fields of ``raw`` lenslab uses, checked; None when it is not this run's status."""
    if not isinstance(raw, dict) or raw.get("name") != name:
        return None
    state = raw.get("state")
    status: dict[str, Any] = {"name": name, "state": state if state in STATES else "unknown"}
    for key in _NUMBERS:
        status[key] = _number(raw.get(key))
    message = raw.get("message")
    status["message"] = text(message) if isinstance(message, str) else None
    ckpt = raw.get("last_checkpoint")
    step, when = (_number(ckpt.get("step")), _number(ckpt.get("time"))) if isinstance(ckpt, dict) else (None, None)
    status["last_checkpoint"] = {"step": int(step), "time": when} if step is not None and when is not None else None
    if isinstance(raw.get("saes"), list):  # a group run: one entry per SAE
        status["saes"] = [_sae(entry) for entry in raw["saes"][:64] if isinstance(entry, dict)]
    return status


def clean_gpu(raw: object) -> dict[str, Any] | None:
    """A run's placement as the box recorded it, checked: ``{"state": "placed", "index": 0,
    "uuid": ..., "at": ...}`` or ``{"state": "queued", "index": None, ...}``; None otherwise."""
    if not isinstance(raw, dict) or raw.get("state") not in ("placed", "queued"):
        return None
    at = _number(raw.get("at"))
    if raw["state"] == "queued":
        return {"state": "queued", "index": None, "uuid": None, "at": at}
    index, uuid = raw.get("index"), raw.get("uuid")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= MAX_GPU_INDEX:
        return None
    uuid = uuid if isinstance(uuid, str) and GPU_UUID.fullmatch(uuid) else None
    return {"state": "placed", "index": index, "uuid": uuid, "at": at}


def current_gpu(raw: object, container: dict[str, Any] | None) -> dict[str, Any] | None:
    """The placement of the container's launch: recorded while it runs, not before it was made."""
    gpu = clean_gpu(raw)
    if gpu is None or container is None or container.get("state") not in ("running", "restarting"):
        return None
    return gpu if (gpu["at"] or 0.0) >= container["created"] else None


def is_queued(status: dict[str, Any]) -> bool:
    """Whether the run's live launch waits for a GPU (a box with GPUs, every one in use)."""
    gpu = status.get("gpu")
    return isinstance(gpu, dict) and gpu.get("state") == "queued"


def read_gpu(runner: Runner, run_dir: str, container: dict[str, Any] | None) -> dict[str, Any] | None:
    """The run's placement by its container's current launch (see ``current_gpu``)."""
    out = runner.run(f"head -c {MAX_STATUS_BYTES} {shlex.quote(f'{run_dir}/{GPU_FILE}')} 2>/dev/null")
    return current_gpu(_json_or_none(out.stdout), container)


def _sae(entry: dict[str, Any]) -> dict[str, Any]:
    losses = entry.get("losses")
    losses = losses if isinstance(losses, dict) else {}
    return {
        "name": text(entry.get("name"), 64),
        "architecture": text(entry.get("architecture"), 64),
        "hook_name": text(entry.get("hook_name"), 120),
        "d_sae": _number(entry.get("d_sae")),
        "losses": {text(k, 64): _number(v) for k, v in list(losses.items())[:8]},
    }


def read_status(runner: Runner, path: str) -> dict[str, Any] | None:
    """The run's status.json, checked (the run's name is its directory's)."""
    name = path.rstrip("/").rsplit("/", 2)[-2]
    out = runner.run(f"head -c {MAX_STATUS_BYTES} {shlex.quote(path)} 2>/dev/null")
    try:
        return clean_status(json.loads(out.stdout), name)
    except ValueError:
        return None  # not there yet (it is replaced atomically, so never half-written)


def statuses(runner: Runner, runs_dir: str, box: str) -> list[dict[str, Any]]:
    """Every run's status under ``runs_dir`` with its container's facts (``container``: None
    when it has none) and its GPU (``gpu``: None when it has none); one round trip. Entries
    that are not valid runs are skipped."""
    runs = shlex.quote(runs_dir)
    filters = " ".join(
        f"--filter {shlex.quote(f'label={label}')}" for label in (f"{BOX_LABEL}={box}", f"{ROLE_LABEL}=train")
    )
    # Each record is "S <base64 name> <base64 status>", "G <base64 name> <base64 gpu.json>" or
    # "C <base64 docker inspect JSON>".
    result = runner.run(
        f'for d in {runs}/*/; do n=${{d%/}}; n=$(printf %s "${{n##*/}}" | base64 | tr -d "\\n"); '
        f'for r in S:{STATUS_FILE} G:{GPU_FILE}; do f="$d${{r#?:}}"; [ -f "$f" ] || continue; '
        f's=$(head -c {MAX_STATUS_BYTES} "$f" | base64 | tr -d "\\n"); printf "%s %s %s\\n" "${{r%%:*}}" "$n" "$s"; '
        "done; done; "
        f"ids=$(docker ps -aq {filters} 2>/dev/null); "
        '[ -z "$ids" ] || printf "C %s\\n" "$(docker inspect $ids 2>/dev/null | base64 | tr -d "\\n")"; true',
        check=True,
    )
    found: dict[str, dict[str, Any]] = {}
    containers: dict[str, dict[str, Any]] = {}
    gpus: dict[str, object] = {}
    for line in result.stdout.splitlines():
        fields = line.split(" ")
        if fields[0] == "S" and len(fields) == 3:
            name = _b64(fields[1])  # exactly the directory's name: a trailing newline stays
            status = _json_or_none(_b64(fields[2]))
            checked = clean_status(status, name) if is_run_name(name) else None
            if checked is not None:
                found[name] = checked
        elif fields[0] == "G" and len(fields) == 3:
            gpus[_b64(fields[1])] = _json_or_none(_b64(fields[2]))
        elif fields[0] == "C" and len(fields) == 2:
            containers = _containers(_json_or_none(_b64(fields[1])))
    for name in containers:
        found.setdefault(name, {"name": name, "state": "starting", "last_checkpoint": None})
    for name, status in found.items():
        status["container"] = containers.get(name)
        status["gpu"] = current_gpu(gpus.get(name), status["container"])
    return [found[name] for name in sorted(found)]


def _b64(value: str) -> str:
    try:
        return base64.b64decode(value, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return ""


def _json_or_none(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return None


def _containers(inspected: object) -> dict[str, dict[str, Any]]:
    """Run name -> facts, from `docker inspect`'s array; containers with a bad label are skipped."""
    out: dict[str, dict[str, Any]] = {}
    for item in inspected if isinstance(inspected, list) else []:
        facts = facts_from_inspect(item)
        labels = (item.get("Config") or {}).get("Labels") or {} if isinstance(item, dict) else {}
        run = labels.get(RUN_LABEL) if isinstance(labels, dict) else None
        if facts is not None and isinstance(run, str) and is_run_name(run):
            out[run] = facts
    return out


def facts_from_inspect(item: object) -> dict[str, Any] | None:
    """state ("running", "exited", ...), exit_code, restarts and created (unix seconds)."""
    if not isinstance(item, dict) or not isinstance(item.get("State"), dict):
        return None
    state = item["State"]
    created = docker_time(item.get("Created"))
    exit_code, restarts = state.get("ExitCode"), item.get("RestartCount")
    return {
        "state": text(state.get("Status"), 20),
        "exit_code": exit_code if isinstance(exit_code, int) else None,
        "restarts": restarts if isinstance(restarts, int) else 0,
        "created": created if created is not None else 0.0,
    }


def docker_time(value: object) -> float | None:
    """Docker's RFC 3339 time with nanoseconds ("2026-11-27T10:00:00.123456789Z") as unix seconds."""
    match = _DOCKER_TIME.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        return None
    when = datetime.strptime(match[1], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc)
    return when.timestamp() + float(f"0.{match[2] or '0'}")


def container_facts(client: docker.DockerClient, name: str) -> dict[str, Any] | None:
    import docker.errors

    with engine_errors():
        try:
            return facts_from_inspect(client.api.inspect_container(name))
        except docker.errors.NotFound:
            return None


def log_tail(client: docker.DockerClient, name: str, lines: int = LOG_TAIL_LINES) -> list[str]:
    """The container's last log lines, each one printable line (empty when it has none)."""
    import docker.errors

    with engine_errors():
        try:
            raw = client.api.logs(name, stdout=True, stderr=True, tail=lines)
        except docker.errors.NotFound:
            return []
    data = raw if isinstance(raw, bytes) else b""
    # A progress bar's carriage-return frames split into lines here; blank ones are dropped.
    return [text(line) for line in data.decode("utf-8", "replace").splitlines() if line.strip()][-lines:]
