"""The lab on a box with a Docker engine: reaching the engine and bringing its lab up.

``bring_up`` is the container half of ``lenslab up`` (image, dev container); ``LabSession`` is
the Docker backend ``lenslab.remote.labs.open_lab`` hands to ``train``, ``runs``, ``logs``,
``stop``, ``pull`` and ``jupyter``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import docker

    from lenslab.config import Config
    from lenslab.remote.bootstrap import Runner
    from lenslab.remote.follow import Follower
    from lenslab.remote.lab import Lab
    from lenslab.runfile import RunFile


@dataclass
class LabSession:
    """The lab backend of a box with a Docker engine (see ``lenslab.remote.labs.LabBackend``):
    training containers with a restart policy, Jupyter in the dev container."""

    runner: Runner
    client: docker.DockerClient
    lab: Lab

    def start_run(self, run: RunFile) -> str:
        from lenslab.remote import training

        return str(training.start(self.client, self.runner, self.lab, run).name)

    def wait_started(self, name: str, timeout: float) -> dict[str, Any]:
        from lenslab.remote import training

        return training.wait_started(self.client, self.runner, self.lab, name, timeout)

    def list_runs(self) -> list[dict[str, Any]]:
        from lenslab.remote import training

        return training.box_runs(self.runner, self.lab)

    def stream_log(self, follower: Follower, follow: bool) -> bool:
        return follower.stream_docker(self, follow)

    def stop_run(self, name: str) -> int | None:
        from lenslab.remote import training

        return training.stop(self.client, name)

    def jupyter_access(self) -> tuple[int, str]:
        from lenslab.errors import LenslabError
        from lenslab.remote import lab as labs

        container = labs.find(self.client, self.lab.dev_name())
        if container is None or container.status != "running":
            raise LenslabError(f"the dev container {self.lab.dev_name()} is not running", "run `lenslab up`")
        return labs.jupyter_access(container)


def build_context(cfg: Config) -> Path | None:
    """Where the image is built from: box.build_context, else lenslab.toml's directory when it
    holds a Dockerfile, else nowhere (the image must already be on the box)."""
    from lenslab.errors import ConfigError

    base = cfg.path.resolve().parent
    if cfg.box.build_context:
        context = (base / Path(cfg.box.build_context).expanduser()).resolve()
        if not (context / "Dockerfile").is_file():
            raise ConfigError(f"{cfg.path}: box.build_context: no Dockerfile in {context}")
        return context
    return base if (base / "Dockerfile").is_file() else None


def bring_up(cfg: Config, runner: Runner, root: str, show: Callable[[str], None]) -> dict[str, Any]:
    """The image (built or reused) and the dev container (kept when current); a summary."""
    from lenslab.remote import image as images
    from lenslab.remote import lab as labs
    from lenslab.remote.engine import open_engine

    resolved, gpus = labs.probe(runner, root)
    client = open_engine(runner)
    try:
        context = build_context(cfg)
        if context is None:
            image_id = images.find_image(client, cfg.box.image)
            if image_id is None:
                return {
                    "skipped": f"no image {cfg.box.image} on the box and no Dockerfile to build it from; "
                    "set box.build_context to the directory with lenslab's Dockerfile"
                }
            built = False
        else:
            show("image (build context hash)")
            ref = images.ensure_image(client, context, cfg.box.image, cfg.box.build_args, on_line=show)
            image_id, built = ref.image_id, ref.built
        lab = labs.Lab(cfg.box.name, resolved, cfg.box.image, gpus)
        show("dev container")
        container, action = labs.ensure_dev_container(client, lab, image_id, cfg.box.jupyter_port)
        return {"image": cfg.box.image, "image_built": built, "dev_container": container.name, "action": action}
    finally:
        client.close()


@contextmanager
def docker_lab(runner: Runner, lab: Lab) -> Iterator[LabSession]:
    """The Docker backend on an open link: the box's engine, closed afterwards."""
    from lenslab.remote.engine import open_engine

    client = open_engine(runner)
    try:
        yield LabSession(runner, client, lab)
    finally:
        client.close()


@contextmanager
def open_lab(cfg: Config, attempts: int = 3) -> Iterator[LabSession]:
    """The Docker backend of the box ``cfg`` names, for commands that need its engine itself
    (``lenslab eval`` runs in the dev container); the lab commands use ``labs.open_lab``."""
    from lenslab.remote.labs import open_lab as open_any

    with open_any(cfg, attempts) as lab:
        if not isinstance(lab, LabSession):
            from lenslab.errors import LenslabError

            raise LenslabError(
                f"box {cfg.box.name} has no Docker engine, and this command runs in its dev container",
                "run it on the box itself, e.g. `lenslab ssh -- lenslab-eval runs/NAME`",
            )
        yield lab
