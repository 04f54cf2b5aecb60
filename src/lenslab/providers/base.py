"""The interface every provider implements, and what each one declares it can do.

A provider turns the ``[box]`` table into a reachable ``Box`` and back:
- ``launch``: create the box, or return the live one (safe to re-run);
- ``get``: the live box, or None when there is none;
- ``connect``: wait until the box answers and return a runner for commands on it;
- ``terminate``: give the machine back (a no-op for machines lenslab did not create; safe to re-run).

What differs between providers is declared once, in ``Capabilities``, and asked for in one way
(``provider.capabilities.interruptible``); the CLI, the config and ``remote/`` never test a
provider's name. Optional abilities have a default here that does nothing, so every provider
answers every question. Providers are found through ``lenslab.providers.registry``.

Nothing heavy is imported at module load: ``lenslab.toml`` validation imports provider classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from lenslab.errors import ProviderError

if TYPE_CHECKING:
    from collections.abc import Callable

    from lenslab.config import BoxConfig, Config
    from lenslab.providers.offers import Offer
    from lenslab.records import Box
    from lenslab.remote.bootstrap import Runner
    from lenslab.remote.lab import Lab
    from lenslab.remote.labs import LabBackend

# How a box's idle/budget watcher acts: "none": no watcher (the user's own machine, in use by
# them); "poweroff": only when the user opts in (box.autostop_poweroff), powering it off;
# "watch": always (unless autostop = "off"); the provider's inputs say how it stops itself.
AutostopKind = Literal["none", "poweroff", "watch"]


@dataclass(frozen=True)
class Capabilities:
    """What a provider can do; every question about a provider is one of these fields."""

    # lenslab rents the machine: `up` spends money after consent, `down` terminates it.
    rents_machines: bool = False
    # Price, hours and cost so far are known (`lenslab status`, budget_usd).
    cost: bool = False
    # A cloud file system / network volume holds the persistent root and outlives instances.
    persistent_volumes: bool = False
    autostop: AutostopKind = "none"
    # The provider hands the watcher what it needs to stop the instance through the API.
    autostop_inputs: bool = False
    interruptible: bool = False  # spot / bid instances can be rented
    stop_resume: bool = False  # an instance can be stopped and resumed with its disk
    container_box: bool = False  # the instance is itself a container: no Docker engine in it
    this_machine: bool = False  # the box is the machine lenslab runs on
    offers: bool = False  # live offers with prices (`lenslab offers`)
    # `lenslab up` can create a box of this provider now; when False, `up` says why in one line.
    launches: bool = True
    api_key_env: str | None = None  # e.g. "RUNPOD_API_KEY"
    api_key_file: str | None = None  # file name under ~/.config/lenslab/, e.g. "runpod-api-key"
    # Runs go to this batch scheduler on the box (a cluster's login node) instead of its own lab.
    scheduler: Literal["none", "slurm"] = "none"

    @property
    def needs_api_key(self) -> bool:
        return self.api_key_env is not None


@dataclass(frozen=True)
class OfferQuery:
    """What `lenslab offers` and `up --cheapest` ask for; providers may narrow their search by it."""

    gpu: str | None = None  # a substring of the GPU name, case-insensitive ("A100", "4090")
    min_vram_gb: float | None = None
    interruptible: bool = False  # only offers with an interruptible price
    regions: tuple[str, ...] | None = None

    def accepts(self, offer: Offer) -> bool:
        if self.gpu and self.gpu.lower() not in offer.gpu_name.lower():
            return False
        if self.min_vram_gb is not None and offer.vram_gb < self.min_vram_gb:
            return False
        if self.interruptible and offer.price_interruptible is None:
            return False
        return not (self.regions and offer.region not in self.regions)


@dataclass(frozen=True)
class AutostopInputs:
    """What the box's watcher gets from the provider: settings merged into its config, and a
    key stored on the box (root only) under ``key_name`` when the box stops itself."""

    settings: dict[str, Any] = field(default_factory=dict)
    api_key: str | None = None
    key_name: str | None = None


def config_dir() -> Path:
    return Path.home() / ".config" / "lenslab"


class Provider:
    """The base of every provider: the four box operations, and defaults for the rest."""

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities] = Capabilities()
    # Where the persistent root lives when lenslab.toml does not say; "~" is the box user's home.
    default_root: ClassVar[str] = "~/lenslab"
    summary: ClassVar[str] = ""  # one line for `lenslab init`'s lenslab.toml and --help
    starter_notes: ClassVar[str] = ""  # commented lenslab.toml lines for this provider's fields

    @classmethod
    def for_cli(cls, *, assume_yes: bool = False) -> Provider:
        """The provider as the CLI uses it; ``assume_yes`` accepts a launch's price (``--yes``)."""
        return cls()

    @classmethod
    def config_problem(cls, cfg: BoxConfig) -> str | None:
        """What is missing from ``[box]`` for this provider, in words, or None."""
        return None

    # -- keys ------------------------------------------------------------------------------

    @classmethod
    def key_file(cls) -> Path | None:
        name = cls.capabilities.api_key_file
        return None if name is None else config_dir() / name

    @classmethod
    def api_key(cls) -> str | None:
        """The key from its environment variable or its chmod 600 file; None when there is none."""
        from lenslab import config

        env, file = cls.capabilities.api_key_env, cls.key_file()
        if env is None or file is None:
            return None
        return config.secret(env, file)

    @classmethod
    def key_hint(cls) -> str:
        return f"set {cls.capabilities.api_key_env} or write ~/.config/lenslab/{cls.capabilities.api_key_file}"

    # -- the box ---------------------------------------------------------------------------

    def launch(self, cfg: BoxConfig) -> Box:
        raise NotImplementedError

    def get(self, cfg: BoxConfig) -> Box | None:
        raise NotImplementedError

    def connect(self, box: Box, *, attempts: int | None = None) -> Runner:
        raise NotImplementedError

    def terminate(self, box: Box) -> None:
        raise NotImplementedError

    # -- optional abilities (see Capabilities) ---------------------------------------------

    def offers(self, query: OfferQuery) -> list[Offer]:
        """Live offers (``capabilities.offers``); the key is read here."""
        raise ProviderError(f"provider {self.name} lists no offers")

    def launch_offer(self, cfg: BoxConfig, offer: Offer) -> Box:
        """Launch the chosen ``offer`` (``lenslab up --cheapest``), after the user agreed."""
        raise ProviderError(
            f"provider {self.name} cannot launch a chosen offer yet", "run `lenslab up` without --cheapest"
        )

    def still_billing(self, box: Box) -> str | None:
        """What to tell the user when something fails after the instance was launched."""
        return None

    def autostop_inputs(self, cfg: BoxConfig) -> AutostopInputs:
        return AutostopInputs()

    def scheduler_lab(self, cfg: Config, runner: Runner, lab: Lab) -> LabBackend:
        """The lab backend of a box whose runs go to a batch scheduler (``capabilities.scheduler``)."""
        raise ProviderError(f"provider {self.name} submits runs to no batch scheduler")

    def cost(self, box_name: str) -> dict[str, Any] | None:
        """Price, hours and cost so far (``capabilities.cost``)."""
        return None

    def instances_seen(self) -> list[dict[str, Any]]:
        """Every instance lenslab has for the box (all bill), as the last launch/get saw them."""
        return []

    def kept_note(self) -> str:
        """What `down` adds about data that stays (and may bill) after the instance is gone."""
        return ""

    def purge(self, cfg: BoxConfig, ask: Callable[[str], bool], assume_yes: bool) -> str | None:
        """Delete the box's persistent volume after an explicit yes; what was deleted, or None."""
        raise ProviderError(
            f"--purge deletes a cloud file system; box {cfg.name} is {cfg.provider}",
            f"delete the data in {cfg.persistent_root} on the box yourself if you mean to",
        )


# A provider class as the registry hands it out.
ProviderClass = type[Provider]


def provider_for(cfg: BoxConfig, *, assume_yes: bool = False) -> Provider:
    """The provider ``[box]`` names (or the one `lenslab watch` moved the box to: ``placement``),
    ready for the CLI; ``assume_yes`` is ``lenslab up --yes``."""
    from lenslab.providers.placement import where
    from lenslab.providers.registry import provider_class

    return provider_class(where(cfg)).for_cli(assume_yes=assume_yes)


def add_note(exc: BaseException, note: str) -> None:
    """Append ``note`` to the one line ``exc`` prints, keeping its class and exit code (the
    CLI prints ``str(exc)``, which is built from ``args``)."""
    exc.args = (f"{exc}; {note}",)
