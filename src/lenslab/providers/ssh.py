"""The ssh provider: any machine the user can already SSH into (a rented GPU box, a university
server, a home workstation). The machine exists before lenslab and outlives it, so ``launch``
only describes it and ``terminate`` leaves it alone. paramiko is imported only to connect."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from lenslab import files
from lenslab.providers.base import Capabilities, Provider

if TYPE_CHECKING:
    from lenslab.config import BoxConfig
    from lenslab.records import Box
    from lenslab.remote.bootstrap import Runner
    from lenslab.remote.ssh import Target


class SSHProvider(Provider):
    name = "ssh"
    # The machine may not be the user's alone: the watcher powers it off only when asked to.
    capabilities: ClassVar[Capabilities] = Capabilities(autostop="poweroff")
    default_root: ClassVar[str] = "~/lenslab"
    summary: ClassVar[str] = "any machine you can SSH into"
    starter_notes: ClassVar[str] = """\
# For provider = "ssh": where the box is and who you log in as.
# host = "203.0.113.7"
# user = "ubuntu"
# port = 22
# identity_file = "~/.ssh/id_ed25519"   # default: ~/.ssh/lenslab/id_ed25519 (lenslab init makes it)
"""

    @classmethod
    def config_problem(cls, cfg: BoxConfig) -> str | None:
        for field in ("host", "user"):
            if not getattr(cfg, field):
                return f"provider '{cls.name}' needs box.{field}"
        return None

    def launch(self, cfg: BoxConfig) -> Box:
        return self._box(cfg)

    def get(self, cfg: BoxConfig) -> Box | None:
        return self._box(cfg)

    def connect(self, box: Box, *, attempts: int | None = None) -> Runner:
        from lenslab.remote.ssh import CONNECT_ATTEMPTS, SSHLink

        return SSHLink.connect(target(box), attempts=CONNECT_ATTEMPTS if attempts is None else attempts)

    def terminate(self, box: Box) -> None:
        """The machine is the user's: nothing to give back."""

    def _box(self, cfg: BoxConfig) -> Box:
        from lenslab.records import Box

        assert cfg.host and cfg.user, "validated by BoxConfig"
        identity = Path(cfg.identity_file).expanduser() if cfg.identity_file else files.default_key_path()
        return Box(
            name=cfg.name,
            provider=self.name,
            alias=cfg.alias,
            root=cfg.persistent_root,
            host=cfg.host,
            port=cfg.port,
            user=cfg.user,
            identity_file=identity,
            host_key_fingerprint=cfg.host_key_fingerprint,
        )


def target(box: Box) -> Target:
    from lenslab.remote.ssh import Target

    assert box.host and box.user and box.identity_file, "ssh boxes always carry these"
    return Target(
        host=box.host,
        port=box.port,
        user=box.user,
        identity_file=box.identity_file,
        known_hosts=files.known_hosts_path(),
        expected_fingerprint=box.host_key_fingerprint,
    )
