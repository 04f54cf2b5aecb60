"""`lenslab watch` in the foreground: the box's provider, the runs it was told about, the loop."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lenslab.config import Config
    from lenslab.providers.container_cloud import ContainerCloud


def watchable(cfg: Config) -> ContainerCloud:
    """The box's provider, able to relaunch without asking (running `lenslab watch` is the
    consent, within budget_usd); one line when its boxes cannot be watched."""
    from lenslab import runmirror
    from lenslab.errors import ConfigError
    from lenslab.providers.base import provider_for
    from lenslab.providers.container_cloud import ContainerCloud

    provider = provider_for(cfg.box, assume_yes=True)
    if not isinstance(provider, ContainerCloud):
        raise ConfigError(
            f"lenslab watch keeps cloud boxes rented by the hour going; box {cfg.box.name} is {cfg.box.provider}",
            "use it with a provider that has interruptible instances (`lenslab offers --interruptible`)",
        )
    if cfg.box.budget_usd is None:  # every relaunch spends with no one asked: it needs a cap
        raise ConfigError(
            f"lenslab watch relaunches box {cfg.box.name} with no one to ask, so it needs a cap on spending",
            "set budget_usd (dollars) in [box] of lenslab.toml, then watch again",
        )
    runmirror.mirror_env(cfg.box)  # the restarts upload the mirror's credentials: they must be set here
    return provider


def told(path: Path) -> tuple[str, str]:
    """A run file named on the command line: its run name and absolute path."""
    from lenslab import runfile

    return runfile.load(path, None).name, str(path.resolve())


def foreground(
    cfg: Config, provider: ContainerCloud, runs: list[tuple[str, str]], poll: float, say: Callable[[str], None]
) -> int:
    from lenslab.errors import ProviderError
    from lenslab.watch.runs import LabRuns
    from lenslab.watch.state import BUDGET, RECOVERING, WATCHING, WatchedRun
    from lenslab.watch.watcher import Watcher

    watcher = Watcher(cfg, provider, LabRuns(cfg, say=say), say=say, poll_seconds=poll)
    st = watcher.state
    if not st.instance and provider.current(cfg.box) is None:
        raise ProviderError(f"box {cfg.box.name} is not running", "start it with `lenslab up`, then watch it")
    for name, run_file in runs:
        known = st.run(name)
        if known is None:
            st.runs.append(WatchedRun(name=name, run_file=run_file))
        else:
            known.run_file, known.finished = run_file, False
    if st.phase != RECOVERING:
        st.phase = WATCHING  # a new watch after a finish or a budget stop starts over
    say(f"watching box {cfg.box.name} on {provider.name} (every {poll:g} s)")
    if watcher.run() == BUDGET:
        say("box.budget_usd reached: runs stopped with a checkpoint, nothing more is launched")
    else:
        say("every watched run finished; the box's autostop stops it when idle (or `lenslab down` now)")
    return 0
