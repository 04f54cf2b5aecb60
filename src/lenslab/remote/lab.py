"""The containers lenslab keeps on a box: the dev container (VSCode, Jupyter) and what they share.

Every container carries ``lenslab.box=<name>`` (``lenslab down`` stops exactly those), runs on
the host network (Jupyter binds 127.0.0.1 on the box, reached only through an SSH tunnel) and
mounts the persistent root at ``/lab``, where the image expects it.
"""

from __future__ import annotations

import secrets
import shlex
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lenslab.contract import BOX_LABEL, ROLE_LABEL
from lenslab.remote.engine import TOOLKIT_FIX, GPUNotVisible, engine_errors

if TYPE_CHECKING:
    import docker
    from docker.models.containers import Container

    from lenslab.remote.bootstrap import Runner

PORT_LABEL = "lenslab.jupyter-port"
MOUNT_POINT = "/lab"


@dataclass(frozen=True)
class Lab:
    """What the containers of one box need to know about it."""

    box: str
    root: str  # the persistent root, absolute, as the box resolved it
    image: str
    gpus: bool  # the box has an NVIDIA GPU: containers ask for all of them

    def dev_name(self) -> str:
        return f"lenslab-dev-{self.box}"

    def volumes(self) -> dict[str, dict[str, str]]:
        return {self.root: {"bind": MOUNT_POINT, "mode": "rw"}}

    def device_requests(self) -> list[Any]:
        if not self.gpus:
            return []
        from docker.types import DeviceRequest

        return [DeviceRequest(count=-1, capabilities=[["gpu"]])]


def probe(runner: Runner, root: str) -> tuple[str, bool]:
    """The root as an absolute path ("~" is the login user's home) and whether there is a GPU,
    in one round trip."""
    # `~` must expand on the box, so it is left outside the quotes.
    expanded = f"~{shlex.quote(root[1:])}" if root.startswith("~") else shlex.quote(root)
    result = runner.run(
        f"printf '%s\\n' {expanded}; command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -c '^GPU'",
    )
    lines = result.stdout.splitlines()
    gpus = len(lines) > 1 and lines[1].strip().isdigit() and int(lines[1]) > 0
    return lines[0].rstrip("/") or "/", gpus


def find(client: docker.DockerClient, name: str) -> Container | None:
    import docker.errors

    with engine_errors():
        try:
            return client.containers.get(name)
        except docker.errors.NotFound:
            return None


def ensure_dev_container(client: docker.DockerClient, lab: Lab, image_id: str, jupyter_port: int) -> tuple[Any, str]:
    """The running dev container and what happened ("kept", "started", "replaced")."""
    existing = find(client, lab.dev_name())
    action = "started"
    if existing is not None:
        labels = existing.labels
        if (
            existing.status == "running"
            and existing.image is not None
            and existing.image.id == image_id
            and labels.get(PORT_LABEL) == str(jupyter_port)
        ):
            return existing, "kept"
        with engine_errors():
            existing.remove(force=True)
        action = "replaced"
    command = [
        "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={jupyter_port}",
        f"--ServerApp.root_dir={MOUNT_POINT}",
    ]  # fmt: skip
    with engine_errors():
        container = client.containers.run(
            image_id,
            command,
            name=lab.dev_name(),
            detach=True,
            network_mode="host",
            volumes=lab.volumes(),
            device_requests=lab.device_requests(),
            restart_policy={"Name": "unless-stopped"},
            labels={BOX_LABEL: lab.box, ROLE_LABEL: "dev", PORT_LABEL: str(jupyter_port)},
            # Jupyter reads its token from here; `lenslab jupyter` reads it back from the container.
            environment={"JUPYTER_TOKEN": secrets.token_hex(24)},
        )
    if lab.gpus:
        check_gpu(container)
    return container, action


def check_gpu(container: Any) -> None:
    """A host with a GPU whose container toolkit is missing starts the container without one."""
    with engine_errors():
        code, output = container.exec_run(["nvidia-smi", "-L"])
    if code != 0:
        detail = output.decode(errors="replace").strip().splitlines()[-1:] or ["nvidia-smi failed"]
        raise GPUNotVisible(f"the box has a GPU but the container sees none ({detail[0][:200]})", TOOLKIT_FIX)


def jupyter_access(container: Any) -> tuple[int, str]:
    """The port and token the dev container's Jupyter was started with."""
    env = dict(item.split("=", 1) for item in container.attrs["Config"]["Env"] if "=" in item)
    return int(container.labels[PORT_LABEL]), env["JUPYTER_TOKEN"]
