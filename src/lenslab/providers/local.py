"""The local provider: the user's own machine is the box (a local GPU, or the embedded default)."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from lenslab.providers.base import Capabilities, Provider

if TYPE_CHECKING:
    from lenslab.config import BoxConfig
    from lenslab.records import Box
    from lenslab.remote.bootstrap import Runner


class LocalProvider(Provider):
    name = "local"
    capabilities: ClassVar[Capabilities] = Capabilities(this_machine=True)
    default_root: ClassVar[str] = "~/.local/share/lenslab"
    summary: ClassVar[str] = "this machine"

    def launch(self, cfg: BoxConfig) -> Box:
        return self._box(cfg)

    def get(self, cfg: BoxConfig) -> Box | None:
        return self._box(cfg)

    def connect(self, box: Box, *, attempts: int | None = None) -> Runner:
        from lenslab.remote.bootstrap import LocalRunner

        return LocalRunner()

    def terminate(self, box: Box) -> None:
        """Nothing to give back: lenslab never owns the user's own machine."""

    def _box(self, cfg: BoxConfig) -> Box:
        from lenslab.records import Box

        return Box(name=cfg.name, provider=self.name, alias=cfg.alias, root=cfg.persistent_root)
