"""What the container commands share: reaching the box's engine and bringing its lab up.

``bring_up`` is the container half of ``lenslab up`` (image, dev container); ``open_lab`` is
how ``train``, ``runs``, ``logs``, ``stop``, ``pull`` and ``jupyter`` get a link, an engine
client and the box's facts in one go.
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
    from lenslab.remote.lab import Lab


@dataclass
class LabSession:
    runner: Runner
    client: docker.DockerClient
    lab: Lab


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
def open_lab(cfg: Config, attempts: int = 3) -> Iterator[LabSession]:
    from lenslab import sshconfig
    from lenslab.errors import ProviderError
    from lenslab.providers.base import provider_for
    from lenslab.remote import lab as labs
    from lenslab.remote.engine import open_engine

    provider = provider_for(cfg.box)
    # get, not launch: only `up` creates boxes.
    box = provider.get(cfg.box)
    if box is None:
        raise ProviderError(f"box {cfg.box.name} is not running", "start it with `lenslab up`")
    runner = provider.connect(box, attempts=attempts)
    try:
        # `up` recorded the resolved root; asking the box again costs one round trip.
        recorded = sshconfig.recorded_root(box.alias) if box.host else None
        resolved, gpus = labs.probe(runner, recorded or box.root)
        client = open_engine(runner)
        try:
            yield LabSession(runner, client, labs.Lab(cfg.box.name, resolved, cfg.box.image, gpus))
        finally:
            client.close()
    finally:
        runner.close()
