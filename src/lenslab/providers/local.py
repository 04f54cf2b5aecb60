"""The local provider: the user's own machine is the box (a local GPU, or the embedded default)."""

from __future__ import annotations

from lenslab.config import BoxConfig
from lenslab.records import Box
from lenslab.remote.bootstrap import LocalRunner, Runner


class LocalProvider:
    name = "local"

    def launch(self, cfg: BoxConfig) -> Box:
        return self._box(cfg)

    def get(self, cfg: BoxConfig) -> Box | None:
        return self._box(cfg)

    def connect(self, box: Box, *, attempts: int = 1) -> Runner:
        return LocalRunner()

    def terminate(self, box: Box) -> None:
        """Nothing to give back: lenslab never owns the user's own machine."""

    @staticmethod
    def _box(cfg: BoxConfig) -> Box:
        return Box(name=cfg.name, provider="local", alias=cfg.alias, root=cfg.persistent_root)
