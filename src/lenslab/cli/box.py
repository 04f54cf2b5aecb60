"""``lenslab up`` and ``lenslab down``: bring the box to a ready state, and stand it down."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from lenslab.cli.common import Progress, add_command, emit, load_config

if TYPE_CHECKING:
    from pathlib import Path

    from lenslab.config import BoxConfig, Config
    from lenslab.providers.base import Provider
    from lenslab.records import Box


def up(args: argparse.Namespace) -> int:
    """Make the box ready: reach it, bootstrap it, write its ssh config entry.

    Bootstrap installs Docker (and the NVIDIA Container Toolkit on a GPU box) when missing and
    creates the persistent root. Re-running on a ready box changes nothing and takes seconds.

    Example:
      lenslab up
      lenslab up --json | jq .bootstrap.changed
      lenslab up --cheapest        # the cheapest offer matching [box], after asking
    """
    from lenslab import sshconfig
    from lenslab.providers.base import add_note

    cfg = load_config(args)
    progress = Progress(quiet=args.json)
    provider, box = _launch(args, cfg, progress)
    try:
        summary = _make_ready(args, cfg, provider, box, progress)
    except BaseException as exc:
        # The instance bills whether or not lenslab could set it up: say so, and how to stop it.
        note = provider.still_billing(box)
        if note is not None:
            from lenslab.errors import LenslabError

            if isinstance(exc, LenslabError):
                add_note(exc, note)
            else:
                _warn_always(progress, note)
        raise
    if "skipped" in summary.get("lab", {}):
        progress.warn(summary["lab"]["skipped"])
    for warning in summary.get("warnings", []):
        progress.warn(warning)
    if box.host and box.user and box.identity_file:
        entry = sshconfig.Entry(box.alias, box.host, box.port, box.user, box.identity_file, summary.get("root"))
        sshconfig.add(entry)
    emit(
        args,
        {"box": box.name, "alias": box.alias, "bootstrap": summary, "timings": progress.timings},
        _ready_text(box, summary),
    )
    return 0


def _launch(args: argparse.Namespace, cfg: Config, progress: Progress) -> tuple[Provider, Box]:
    """The box's provider and its box: the live one or a new one; with --cheapest, the cheapest
    offer that matches [box], shown and agreed to first."""
    from lenslab.providers.base import provider_for

    provider = provider_for(cfg.box, assume_yes=args.yes)
    if not args.cheapest:
        with progress.step(f"finding box {cfg.box.name} ({provider.name})"):
            return provider, provider.launch(cfg.box)
    from lenslab.cli.offers import cheapest_match, confirm_offer

    with progress.step(f"finding the cheapest {provider.name} offer"):
        offer = cheapest_match(cfg.box, provider)
    confirm_offer(provider.name, offer, args.yes, cfg.box)  # outside the spinner, which would hide it
    # The user agreed to this offer and its price: that is the consent to launch it.
    provider = provider_for(cfg.box, assume_yes=True)
    with progress.step(f"launching {offer.gpu_name} on {provider.name}"):
        return provider, provider.launch_offer(cfg.box, offer)


def _make_ready(
    args: argparse.Namespace, cfg: Config, provider: Provider, box: Box, progress: Progress
) -> dict[str, Any]:
    """Connect and make the box's lab ready (see lenslab.remote.labs.make_ready)."""
    from lenslab.remote import labs

    _check_identity(box.identity_file, cfg.path)
    return labs.make_ready(
        cfg, provider, box, lambda: provider.connect(box, attempts=args.attempts), progress, args.no_containers
    )


def _warn_always(progress: Progress, text: str) -> None:
    """A warning about money is shown even with --json (on stderr, so the JSON stays clean)."""
    import sys

    if progress.quiet:
        print(f"lenslab: warning: {text}", file=sys.stderr)
    else:
        progress.warn(text)


def _check_identity(identity: Path | None, config_path: Path) -> None:
    from lenslab.errors import ConfigError

    if identity is not None and not identity.exists():
        raise ConfigError(
            f"{config_path}: box.identity_file: {identity} does not exist",
            "run `lenslab init` to make lenslab's key, or point identity_file at your key",
        )


def _ready_text(box: Box, summary: dict[str, Any]) -> str:
    gpus = summary.get("gpus") or []
    gpu_text = ", ".join(g["name"] for g in gpus) if gpus else "no GPU (CPU mode)"
    changed = summary.get("changed") or []
    lines = [
        f"box {box.name} is ready: {summary.get('os')} {summary.get('os_version')}, {gpu_text}, "
        f"{_engine_text(summary)}, root {summary.get('root')}",
        f"changed: {'; '.join(changed) if changed else 'nothing (already ready)'}",
    ]
    if box.host:
        lines += [f"shell:  ssh {box.alias}", "VSCode: lenslab code"]
    return "\n".join(lines)


def _engine_text(summary: dict[str, Any]) -> str:
    scheduler = summary.get("scheduler")
    if isinstance(scheduler, dict):  # a cluster's login node: its batch scheduler runs the lab
        return f"{scheduler['name']} {scheduler['version']}, lenslab in {scheduler['venv']['venv']}"
    if summary.get("docker") == "none":  # a box without an engine: lenslab-box runs the lab
        return f"no Docker (lenslab-box {summary.get('lenslab_box')})"
    return f"docker {summary.get('docker')}"


def down(args: argparse.Namespace) -> int:
    """Stop lenslab's containers on the box and remove its ssh config entry; keep all data.

    The persistent root (workspace/, checkpoints/, hf-cache/, runs/) stays on the box. An
    unreachable box still loses its ssh entry, so `down` always succeeds. A cloud box is
    always terminated (every instance lenslab has for it, in any state), even when SSH to it
    fails; then its training was not checkpointed, and `down` says so.

    Example:
      lenslab down
    """
    from lenslab import sshconfig
    from lenslab.providers import placement
    from lenslab.providers.base import provider_for

    cfg = load_config(args)
    progress = Progress(quiet=args.json)
    provider = provider_for(cfg.box)
    # get, not launch: `down` must never create the box it is asked to stand down.
    box = provider.get(cfg.box)
    if box is None:
        removed = sshconfig.remove(cfg.box.alias)
        placement.forget(cfg.box)  # nothing left where it was moved: back to lenslab.toml's provider
        purged = _purge(cfg, args) if args.purge else None
        emit(
            args,
            {"box": cfg.box.name, "running": False, "ssh_entry_removed": removed, "purged": purged},
            f"box {cfg.box.name} is not running; nothing to stop" + (f"; deleted {purged}" if purged else ""),
        )
        return 0
    # A rented box bills until it is terminated; a machine of the user's own is left running.
    terminates = provider.capabilities.rents_machines
    stopped, ssh_error = _stop_on_box(cfg.box, provider, box, progress, terminates)
    _terminate(provider, box, progress, terminates)
    placement.forget(cfg.box)  # the instance where it was moved is gone: back to lenslab.toml's provider
    removed = sshconfig.remove(box.alias) if box.host else False
    purged = _purge(cfg, args) if args.purge else None
    kept = f"deleted {purged}" if purged else f"data kept in {box.root}{provider.kept_note()}"
    terminated = "terminated the instance, " if terminates else ""
    emit(
        args,
        {
            "box": box.name,
            "reachable": ssh_error is None,
            "ssh_error": ssh_error,
            "stopped": stopped,
            "ssh_entry_removed": removed,
            "terminated": terminates,
            "purged": purged,
        },
        f"box {box.name} is down: {terminated}stopped {len(stopped)} container(s)"
        f"{', removed ssh entry ' + box.alias if removed else ''}; {kept}",
    )
    return 0


def _terminate(provider: Provider, box: Box, progress: Progress, terminates: bool) -> None:
    from lenslab.errors import LenslabError

    try:
        with progress.step("terminating the instance" if terminates else "removing the ssh entry"):
            provider.terminate(box)
    except BaseException as exc:
        # A LenslabError's own line says what failed; a Ctrl-C or a bug would say nothing of money.
        if terminates and not isinstance(exc, LenslabError):
            fallback = f"the instance of box {box.name} may still be running and billing; `lenslab down` terminates it"
            _warn_always(progress, f"the instance was not terminated: {provider.still_billing(box) or fallback}")
        raise


def _stop_on_box(
    cfg_box: BoxConfig, provider: Provider, box: Box, progress: Progress, terminates: bool
) -> tuple[list[str], str | None]:
    """Stop lenslab's containers (training checkpoints on the way out); the containers stopped,
    and why SSH failed if it did. For a box about to be terminated any SSH failure is only a
    warning; for another box only an unreachable one is."""
    from lenslab.errors import HostUnreachable, LenslabError
    from lenslab.remote import labs

    try:
        with progress.step("stopping lenslab containers"):
            runner = provider.connect(box, attempts=1)
            try:
                return labs.stop_all(cfg_box, provider, runner, box), None
            finally:
                runner.close()
    except BaseException as exc:  # for a box that bills, whatever went wrong: terminate it anyway
        if not terminates and not isinstance(exc, HostUnreachable):
            raise
        if isinstance(exc, SystemExit):
            raise
        if isinstance(exc, KeyboardInterrupt):
            # Ctrl-C while the containers checkpoint: the user wants out, and out means not billing.
            _warn_always(
                progress,
                "interrupted while stopping training on the box: training may not have been checkpointed; "
                "terminating the instance anyway",
            )
            return [], "interrupted"
        why = str(exc) if isinstance(exc, LenslabError) else f"{type(exc).__name__}: {exc}"
        why = " ".join(why.split())  # one line, whatever the exception carried
        if terminates:
            _warn_always(
                progress,
                f"could not stop training on the box ({why}): training was not checkpointed; "
                "terminating the instance anyway",
            )
        else:
            progress.warn(f"{why}; its containers were left as they are")
        return [], why


def _purge(cfg: Config, args: argparse.Namespace) -> str | None:
    """Delete the box's persistent volume (all its data) after an explicit yes; providers
    without one refuse in one line."""
    from lenslab.providers.base import provider_for

    return provider_for(cfg.box).purge(cfg.box, _ask, bool(args.yes))


def _ask(question: str) -> bool:
    import sys

    return sys.stdin.isatty() and input(question).strip().lower() in ("y", "yes")


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = add_command(commands, "up", up)
    parser.add_argument("--attempts", type=int, default=6, help="connection attempts while the box boots (default: 6)")
    parser.add_argument("--no-containers", action="store_true", help="bootstrap only: no image, no dev container")
    parser.add_argument("--yes", action="store_true", help="accept a cloud launch and its price without asking")
    parser.add_argument(
        "--cheapest",
        action="store_true",
        help="launch the cheapest offer matching box.gpu_types, min_vram_gb, regions, max_price_per_hour",
    )
    parser = add_command(commands, "down", down)
    parser.add_argument(
        "--purge", action="store_true", help="cloud boxes: also delete the persistent volume and its data"
    )
    parser.add_argument("--yes", action="store_true", help="with --purge: delete without asking")
