"""Training containers on the box: one per run, detached, restarted by Docker when they crash.

Layout on the persistent root (mounted at /lab in every container):

    runs-config/<name>/<run file>    what ``lenslab train`` uploaded (plus a local dataset)
    runs/<name>/...                  lenslab-train's run directory (status.json, checkpoints/, final/)

Because checkpoints live on the persistent root, starting the same run name on a new box with
the same root continues it: lenslab-train resumes from the newest valid checkpoint by itself.

A launch counts as started only once the trainer of that launch has written its status: a
``status.json`` whose ``started_at`` is not older than the container (an older one is the
previous launch's, which says nothing about this one).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lenslab.contract import (
    BOX_LABEL,
    EXIT_FINISHED,
    EXIT_INTERRUPTED,
    ROLE_LABEL,
    RUN_LABEL,
    RUNS_DIR,
    STATUS_FILE,
    STOP_TIMEOUT_SECONDS,
)
from lenslab.errors import CommandFailed, DiskFull, LenslabError
from lenslab.remote.boxstate import container_facts, is_queued, log_tail, read_gpu, read_status, statuses
from lenslab.remote.engine import engine_errors
from lenslab.remote.lab import MOUNT_POINT, Lab, find

if TYPE_CHECKING:
    import docker

    from lenslab.remote.bootstrap import Runner
    from lenslab.runfile import RunFile

__all__ = [
    "ACTIVE", "EXIT_INTERRUPTED", "Paths", "container_name", "start", "statuses", "stop", "upload", "wait_started",
]  # fmt: skip

# A crash loop (bad data, OOM every time) stops after this many restarts instead of spinning.
MAX_RESTARTS = 5
ACTIVE = ("running", "restarting", "created")
# How long `lenslab train` waits for the trainer's first status: it imports torch, loads the
# model and tokenizes first, which on a loaded machine takes a minute or more.
START_TIMEOUT_SECONDS = 150.0
POLL_SECONDS = 1.0
# States of a trainer that has started (a finished run may finish before the first look).
STARTED_STATES = ("starting", "running", "finished")


class RunAlreadyRunning(LenslabError):
    exit_code = 8


class RunDidNotStart(LenslabError):
    """The container was created but its trainer never reported in; carries the log tail."""

    def __init__(self, message: str, fix: str, tail: list[str]) -> None:
        super().__init__(message, fix)
        self.tail = tail


@dataclass(frozen=True)
class Paths:
    root: str
    name: str

    @property
    def config_dir(self) -> str:
        return f"{self.root}/runs-config/{self.name}"

    @property
    def run_dir(self) -> str:
        return f"{self.root}/{RUNS_DIR}/{self.name}"

    @property
    def status_file(self) -> str:
        return f"{self.run_dir}/{STATUS_FILE}"


def container_name(run: str) -> str:
    return f"lenslab-train-{run}"


def start(client: docker.DockerClient, runner: Runner, lab: Lab, run: RunFile) -> Any:
    """Upload the run file and start its container; returns the container once Docker started
    it (``wait_started`` then waits for the trainer itself)."""
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
    upload(runner, run, paths)
    command = [
        "lenslab-train",
        f"{MOUNT_POINT}/runs-config/{run.name}/{run.path.name}",
        "--runs-dir", f"{MOUNT_POINT}/{RUNS_DIR}",
    ]  # fmt: skip
    if lab.gpus:
        # One GPU per run: the container waits in the root's queue for a free GPU, then becomes
        # the trainer on it (CUDA_VISIBLE_DEVICES); containers share the root and its locks.
        command = ["lenslab-box", "--root", MOUNT_POINT, "place", run.name, "--", *command]
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
            _image(client, lab),
            command,
            name=container_name(run.name),
            labels={BOX_LABEL: lab.box, ROLE_LABEL: "train", RUN_LABEL: run.name},
            stop_signal="SIGTERM",
            stop_timeout=STOP_TIMEOUT_SECONDS,
            host_config=host_config,
        )
        api.start(created["Id"])
        return client.containers.get(created["Id"])


def upload(runner: Runner, run: RunFile, paths: Paths) -> None:
    """The run file (and a local dataset) into the run's config directory on the box."""
    for rel, data in run.uploads().items():
        _put(runner, data, f"{paths.config_dir}/{rel}")


def _image(client: docker.DockerClient, lab: Lab) -> str:
    """The image `lenslab up` made current for this box: its dev container's, by id. The tag
    alone may have been moved since by another build on the same engine."""
    dev = find(client, lab.dev_name())
    image = getattr(dev, "image", None) if dev is not None else None
    return str(image.id) if image is not None else lab.image


def _put(runner: Runner, data: Any, path: str) -> None:
    try:
        runner.put(data, path)
    except CommandFailed as exc:
        if "No space left" in str(exc):
            raise DiskFull(
                f"the box's disk is full: cannot write {path}", "free space on the box, e.g. `docker system prune`"
            ) from exc
        raise


def wait_started(
    client: docker.DockerClient,
    runner: Runner,
    lab: Lab,
    name: str,
    timeout: float = START_TIMEOUT_SECONDS,
) -> dict[str, Any]:
    """The first status the trainer of this launch wrote; ``RunDidNotStart`` (with the
    container's last log lines) when its container stopped, crashed or stayed silent first."""
    paths = Paths(lab.root, name)
    deadline = time.monotonic() + timeout
    while True:
        # The container first, the status second: a trainer that writes its status and exits
        # between the two looks is then still seen as started.
        facts = container_facts(client, container_name(name))
        if facts is None:
            raise _not_started(client, name, "its container was removed before the trainer started")
        status = read_status(runner, paths.status_file)
        gpu = read_gpu(runner, paths.run_dir, facts) if lab.gpus else None
        if gpu is not None and is_queued({"gpu": gpu}):  # every GPU is busy: it starts when one frees
            return {"name": name, "state": "queued", "gpu": gpu, "resumed_from_step": None}
        if status is not None and (status["started_at"] or 0.0) >= facts["created"]:
            if status.get("state") in STARTED_STATES:
                return status
            why = f"the trainer stopped as it started ({status['state']}: {status['message'] or 'no message'})"
            _halt(client, name)  # a failed start would only fail again under the restart policy
            raise _not_started(client, name, why)
        exited_clean = facts["state"] == "exited" and facts["exit_code"] == EXIT_FINISHED
        if exited_clean and status is not None and status.get("state") == "finished":
            return status  # an already finished run: the trainer said so and exited at once
        if facts["restarts"] or facts["state"] not in ("running", "created"):
            what = f"exited with code {facts['exit_code']}"
            if facts["restarts"]:
                what = f"crashed (exit code {facts['exit_code']}, restarted {facts['restarts']}x)"
            # A crash before any status repeats itself: no restart loop behind a failed launch.
            _halt(client, name)
            raise _not_started(client, name, f"its container {what} before the trainer wrote its status")
        if time.monotonic() >= deadline:
            raise _not_started(
                client, name, f"the trainer wrote no status within {timeout:.0f}s (its container is still running)"
            )
        time.sleep(POLL_SECONDS)


def _not_started(client: docker.DockerClient, name: str, why: str) -> RunDidNotStart:
    return RunDidNotStart(
        f"run {name} did not start: {why}",
        f"see `lenslab logs {name}`; fix the cause, then run `lenslab train` again",
        log_tail(client, container_name(name)),
    )


def _halt(client: docker.DockerClient, name: str) -> None:
    container = find(client, container_name(name))
    if container is not None:
        with engine_errors():
            container.stop(timeout=STOP_TIMEOUT_SECONDS)


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


def box_runs(runner: Runner, lab: Lab) -> list[dict[str, Any]]:
    """Every run on the box's root with its container, if it has one (see ``boxstate``)."""
    return statuses(runner, f"{lab.root}/{RUNS_DIR}", lab.box)
