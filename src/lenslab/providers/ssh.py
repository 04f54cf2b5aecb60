"""The ssh provider: any machine the user can already SSH into (a rented GPU box, a university
server, a home workstation). The machine exists before lenslab and outlives it, so ``launch``
only describes it and ``terminate`` leaves it alone."""

from __future__ import annotations

from pathlib import Path

from lenslab import files
from lenslab.config import BoxConfig
from lenslab.records import Box
from lenslab.remote.bootstrap import Runner
from lenslab.remote.ssh import CONNECT_ATTEMPTS, SSHLink, Target


class SSHProvider:
    name = "ssh"

    def launch(self, cfg: BoxConfig) -> Box:
        return self._box(cfg)

    def get(self, cfg: BoxConfig) -> Box | None:
        return self._box(cfg)

    def connect(self, box: Box, *, attempts: int = CONNECT_ATTEMPTS) -> Runner:
        return SSHLink.connect(target(box), attempts=attempts)

    def terminate(self, box: Box) -> None:
        """The machine is the user's: nothing to give back."""

    @staticmethod
    def _box(cfg: BoxConfig) -> Box:
        assert cfg.host and cfg.user, "validated by BoxConfig"
        identity = Path(cfg.identity_file).expanduser() if cfg.identity_file else files.default_key_path()
        return Box(
            name=cfg.name,
            provider="ssh",
            alias=cfg.alias,
            root=cfg.persistent_root,
            host=cfg.host,
            port=cfg.port,
            user=cfg.user,
            identity_file=identity,
            host_key_fingerprint=cfg.host_key_fingerprint,
        )


def target(box: Box) -> Target:
    assert box.host and box.user and box.identity_file, "ssh boxes always carry these"
    return Target(
        host=box.host,
        port=box.port,
        user=box.user,
        identity_file=box.identity_file,
        known_hosts=files.known_hosts_path(),
        expected_fingerprint=box.host_key_fingerprint,
    )
