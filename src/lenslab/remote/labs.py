"""The lab on a box, whatever runs it: the one place that decides how.

A box either has a Docker engine (training containers with a restart policy, a dev container
for Jupyter and VSCode: ``labsession.LabSession``) or has none, because it is itself a
container or the user said so (``engine = "none"``): then ``lenslab-box`` on the box
supervises runs as processes (``processlab.ProcessLab``). ``has_engine`` decides once, from
the provider's ``capabilities.container_box`` and ``[box] engine``; every lab command goes
through ``open_lab`` and the ``LabBackend`` it yields, and ``up``/``down``/``status`` through
``make_ready``/``stop_all``/``box_facts``.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol

# Containers lenslab starts carry this label; `down` stops exactly those.
from lenslab.contract import BOX_LABEL

if TYPE_CHECKING:
    from lenslab.config import BoxConfig, Config
    from lenslab.providers.base import Provider
    from lenslab.records import Box
    from lenslab.remote.bootstrap import Runner
    from lenslab.remote.follow import Follower
    from lenslab.remote.lab import Lab
    from lenslab.runfile import RunFile


class LabBackend(Protocol):
    """What the lab commands need from a box, however it runs training."""

    runner: Runner
    lab: Lab

    def start_run(self, run: RunFile) -> str:
        """Upload the run file and start the run detached; what runs it (a container's name...)."""

    def wait_started(self, name: str, timeout: float) -> dict[str, Any]:
        """The first status this launch's trainer wrote; ``RunDidNotStart`` when none came."""

    def list_runs(self) -> list[dict[str, Any]]:
        """Every run on the root, checked, each with ``container`` facts (None when it has none)."""

    def stream_log(self, follower: Follower, follow: bool) -> bool:
        """Print the log from where ``follower`` got to; True when following should go on."""

    def stop_run(self, name: str) -> int | None:
        """Stop gracefully (checkpoint, exit 75); the exit code, or None when it was not running."""

    def jupyter_access(self) -> tuple[int, str]:
        """The box-side loopback port and token of a running Jupyter."""


class Progress(Protocol):
    def step(self, text: str) -> Any: ...


def has_engine(cfg: BoxConfig, provider: Provider) -> bool:
    """Whether the box runs the lab in Docker: not when the instance is itself a container
    (the provider says so) or the user says it has no engine (``[box] engine = "none"``)."""
    return not provider.capabilities.container_box and cfg.engine == "docker"


@contextmanager
def open_lab(cfg: Config, attempts: int = 3) -> Iterator[LabBackend]:
    """A link to the box and its lab backend, for ``train``, ``runs``, ``logs``, ``stop``,
    ``pull`` and ``jupyter``."""
    from lenslab import sshconfig
    from lenslab.errors import ProviderError
    from lenslab.providers.base import provider_for
    from lenslab.remote import lab as labs

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
        lab = labs.Lab(cfg.box.name, resolved, cfg.box.image, gpus)
        if provider.capabilities.scheduler != "none":
            yield provider.scheduler_lab(cfg, runner, lab)
        elif has_engine(cfg.box, provider):
            from lenslab.remote.labsession import docker_lab

            with docker_lab(runner, lab) as session:
                yield session
        else:
            from lenslab.remote.processlab import ProcessLab

            yield ProcessLab(runner, lab, cfg.box.jupyter_port)
    finally:
        runner.close()


def make_ready(
    cfg: Config,
    provider: Provider,
    box: Box,
    connect: Callable[[], Runner],
    progress: Progress,
    no_containers: bool,
) -> dict[str, Any]:
    """The box side of `lenslab up`, after the box exists; bootstrap's summary plus ``lab``."""
    where = f"{box.user}@{box.host}:{box.port}" if box.host else "this machine"
    with progress.step(f"connecting to {where}"):
        runner = connect()
    try:
        if provider.capabilities.scheduler != "none":
            from lenslab.remote import slurmbox

            return slurmbox.make_ready(cfg, box, runner, progress)
        if not has_engine(cfg.box, provider):
            from lenslab.config import STOCK_IMAGE
            from lenslab.remote.processlab import prepare

            stock = None
            if provider.capabilities.container_box and cfg.box.image == STOCK_IMAGE:
                from lenslab.remote import stockbox

                with progress.step("lenslab in a venv on the volume") as show:
                    stock = stockbox.ensure(cfg, runner, box.root, show)
            with progress.step("lenslab-box and the persistent root"):
                summary = prepare(cfg.box, runner, box.root)
            if stock is not None:
                summary["lab"]["venv"] = stock
            if provider.capabilities.container_box:
                # Its watcher runs under lenslab-box serve and reads its settings from the volume.
                with progress.step("autostop watcher"):
                    summary["autostop"] = _install_autostop(provider, cfg, box, runner, summary.get("root") or box.root)
            return summary
        return _docker_ready(cfg, provider, box, runner, connect, progress, no_containers)
    finally:
        runner.close()


def _docker_ready(
    cfg: Config,
    provider: Provider,
    box: Box,
    runner: Runner,
    connect: Callable[[], Runner],
    progress: Progress,
    no_containers: bool,
) -> dict[str, Any]:
    """Install the autostop watcher at once (so a box left behind by a failure below still
    stops itself), bootstrap, then the image and dev container."""
    from lenslab.remote.bootstrap import bootstrap
    from lenslab.remote.labsession import bring_up

    with progress.step("autostop watcher"):
        autostop = _install_autostop(provider, cfg, box, runner)
    with progress.step("bootstrapping (Docker, GPU, persistent root)") as show:
        summary = bootstrap(runner, box.root, cfg.box.gpu, cfg.box.min_free_gb, on_output=_bootstrap_lines(show))
    if autostop is not None:
        summary["autostop"] = autostop
    if not no_containers:
        if any("to group" in change for change in summary.get("changed", [])):
            # A new group membership reaches only sessions opened after it was added.
            runner.close()
            runner = connect()
        try:
            with progress.step("image and dev container") as show:
                summary["lab"] = bring_up(cfg, runner, summary.get("root") or box.root, show)
        finally:
            runner.close()
    return summary


def _install_autostop(
    provider: Provider, cfg: Config, box: Box, runner: Runner, container_root: str | None = None
) -> dict[str, Any] | None:
    """Install or update the box's idle watcher (see lenslab.remote.autostop for which boxes);
    on a container box (``container_root``: its persistent root) write its settings there."""
    from lenslab.remote import autostop

    inputs = provider.autostop_inputs(cfg.box)
    settings = autostop.watcher_config(cfg.box, box, provider.capabilities.autostop, inputs.settings)
    if container_root is not None:
        return autostop.install_in_container(runner, container_root, settings, inputs.api_key, inputs.key_name)
    return None if settings is None else autostop.install(runner, settings, inputs.api_key, inputs.key_name)


def _bootstrap_lines(show: Callable[[str], None]) -> Callable[[str, str], None]:
    """Feeds the script's "bootstrap: ..." progress lines to the spinner as they arrive."""

    def sink(stream: str, text: str) -> None:
        for line in text.splitlines():
            if stream == "stdout" and line.startswith("bootstrap: "):
                show(line.removeprefix("bootstrap: "))

    return sink


def stop_all(cfg: BoxConfig, provider: Provider, runner: Runner, box: Box) -> list[str]:
    """`lenslab down`: stop everything lenslab runs on the box, gracefully (training
    checkpoints); the containers (or runs) stopped. A batch scheduler's jobs are left alone."""
    if provider.capabilities.scheduler != "none":
        from lenslab.remote import slurmbox

        return slurmbox.stop_all()
    if has_engine(cfg, provider):
        label = shlex.quote(f"label={BOX_LABEL}={box.name}")
        result = runner.run(
            f"command -v docker >/dev/null || exit 0; ids=$(docker ps -q --filter {label}); "
            '[ -z "$ids" ] || docker stop $ids',
            check=True,
        )
        return [line for line in result.stdout.split() if line]
    from lenslab.remote import processlab
    from lenslab.remote.lab import probe

    root, gpus = probe(runner, box.root)
    return processlab.ProcessLab(runner, _lab(cfg, root, gpus)).stop_all()


def _lab(cfg: BoxConfig, root: str, gpus: bool) -> Lab:
    from lenslab.remote.lab import Lab

    return Lab(cfg.name, root, cfg.image, gpus)


def box_facts(
    cfg: BoxConfig, provider: Provider, runner: Runner, box: Box
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """`lenslab status`'s facts about the box, checked field by field, and the autostop
    watcher's state. On a box without Docker, ``lenslab-box facts`` answers both in one exec
    (a round trip is most of what `status` costs); a box whose lenslab-box predates that, and
    a Docker box (status.sh), are asked for the state apart."""
    from lenslab.remote import autostop
    from lenslab.remote.bootstrap import check_status_facts, status

    if provider.capabilities.scheduler != "none":
        from lenslab.remote import slurmbox
        from lenslab.remote.lab import probe

        return slurmbox.facts(runner, probe(runner, box.root)[0]), None
    if has_engine(cfg, provider):
        return status(runner, box.root, box.name), autostop.read_state(runner)
    from lenslab.remote.processlab import ask

    raw = ask(runner, box.root, "facts", "--json")
    facts = check_status_facts(raw, "lenslab-box facts")
    if not isinstance(raw, dict) or "autostop" not in raw:
        return facts, autostop.read_state(runner)
    state = raw["autostop"]
    return facts, state if isinstance(state, dict) else None  # anything else is no state lenslab wrote
