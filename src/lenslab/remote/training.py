"""Training containers on the box: one per run, detached, restarted by Docker when they crash.

Layout on the persistent root (mounted at /lab in every container):

    runs-config/<name>/<run file>    what ``lenslab train`` uploaded (plus a local dataset)
    runs/<name>/...                  lenslab-train's run directory (status.json, checkpoints/, final/)

Because checkpoints live on the persistent root, starting the same run name on a new box with
the same root continues it: lenslab-train resumes from the newest valid checkpoint by itself.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lenslab.errors import CommandFailed, DiskFull, LenslabError
from lenslab.remote.engine import engine_errors
from lenslab.remote.lab import BOX_LABEL, MOUNT_POINT, ROLE_LABEL, Lab, find

if TYPE_CHECKING:
    import docker

    from lenslab.remote.bootstrap import Runner
    from lenslab.runfile import RunFile

RUN_LABEL = "lenslab.run"
# A crash loop (bad data, OOM every time) stops after this many restarts instead of spinning.
MAX_RESTARTS = 5
# lenslab-train writes a final checkpoint on SIGTERM; Docker waits this long before SIGKILL.
STOP_TIMEOUT_SECONDS = 60
# lenslab-train's exit code for "interrupted by a signal, checkpoint saved".
EXIT_INTERRUPTED = 75
ACTIVE = ("running", "restarting", "created")


class RunAlreadyRunning(LenslabError):
    exit_code = 8


@dataclass(frozen=True)
class Paths:
    root: str
    name: str

    @property
    def config_dir(self) -> str:
        return f"{self.root}/runs-config/{self.name}"

    @property
    def run_dir(self) -> str:
        return f"{self.root}/runs/{self.name}"


def container_name(run: str) -> str:
    return f"lenslab-train-{run}"


def start(client: docker.DockerClient, runner: Runner, lab: Lab, run: RunFile) -> Any:
    """Upload the run file and start its container; returns at once (the container is detached)."""
    existing = find(client, container_name(run.name))
    if existing is not None:
        if existing.status in ACTIVE:
            raise RunAlreadyRunning(
                f"run {run.name} is already {existing.status} on box {lab.box}",
                f"follow it with `lenslab logs {run.name} -f`, stop it with `lenslab stop {run.name}`, "
                "or pick another --name",
            )
        with engine_errors():
            existing.remove(force=True)
    paths = Paths(lab.root, run.name)
    for rel, data in run.files().items():
        _put(runner, data, f"{paths.config_dir}/{rel}")
    command = [
        "lenslab-train",
        f"{MOUNT_POINT}/runs-config/{run.name}/{run.path.name}",
        "--runs-dir", f"{MOUNT_POINT}/runs",
    ]  # fmt: skip
    api = client.api
    with engine_errors():
        # The low-level API: the high-level run() cannot set a stop timeout.
        host_config = api.create_host_config(
            network_mode="host",
            binds=lab.volumes(),
            device_requests=lab.device_requests(),
            restart_policy={"Name": "on-failure", "MaximumRetryCount": MAX_RESTARTS},
        )
        created = api.create_container(
            lab.image,
            command,
            name=container_name(run.name),
            labels={BOX_LABEL: lab.box, ROLE_LABEL: "train", RUN_LABEL: run.name},
            stop_signal="SIGTERM",
            stop_timeout=STOP_TIMEOUT_SECONDS,
            host_config=host_config,
        )
        api.start(created["Id"])
        return client.containers.get(created["Id"])


def _put(runner: Runner, data: bytes, path: str) -> None:
    put = getattr(runner, "put", None)
    if put is not None:
        try:
            put(data, path)
        except CommandFailed as exc:
            if "No space left" in str(exc):
                raise DiskFull(
                    f"the box's disk is full: cannot write {path}", "free space on the box, e.g. `docker system prune`"
                ) from exc
            raise
        return
    # The local provider's box is this machine.
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)


def statuses(runner: Runner, lab: Lab) -> list[dict[str, Any]]:
    """Every run's status.json on the root, with its container's state when it has one; one round trip."""
    runs = shlex.quote(f"{lab.root}/runs")
    label = shlex.quote(f"label={RUN_LABEL}")
    result = runner.run(
        f'for f in {runs}/*/status.json; do [ -f "$f" ] && printf \'S %s\\n\' "$(tr -d \'\\n\' < "$f")"; done; '
        f"docker ps -a --filter {label} --format 'C {{{{.Label \"{RUN_LABEL}\"}}}} {{{{.State}}}}' 2>/dev/null; true",
        check=True,
    )
    found: dict[str, dict[str, Any]] = {}
    containers: dict[str, str] = {}
    for line in result.stdout.splitlines():
        if line.startswith("S "):
            try:
                status = json.loads(line[2:])
            except json.JSONDecodeError:
                continue  # replaced atomically, so only a foreign file can be unreadable
            found[str(status.get("name"))] = status
        elif line.startswith("C "):
            parts = line.split()
            if len(parts) == 3:
                containers[parts[1]] = parts[2]
    for name in containers:
        found.setdefault(name, {"name": name, "state": "starting"})
    for name, status in found.items():
        status["container"] = containers.get(name)
    return [found[name] for name in sorted(found)]


def stop(client: docker.DockerClient, name: str) -> int | None:
    """Stop the run gracefully (SIGTERM: the trainer checkpoints and exits 75); its exit code,
    or None when no container of that name is running."""
    container = find(client, container_name(name))
    if container is None or container.status not in ACTIVE:
        return None
    with engine_errors():
        container.stop(timeout=STOP_TIMEOUT_SECONDS)
        result = container.wait(timeout=STOP_TIMEOUT_SECONDS + 10)
    return int(result.get("StatusCode", -1))
