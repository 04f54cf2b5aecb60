"""``lenslab up`` and ``lenslab down``: bring the box to a ready state, and stand it down."""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lenslab.cli.common import Progress, add_command, emit, load_config

if TYPE_CHECKING:
    from pathlib import Path

    from lenslab.config import Config
    from lenslab.records import Box, OutputSink
    from lenslab.remote.bootstrap import Runner

# Containers lenslab starts carry this label; `down` stops exactly those.
BOX_LABEL = "lenslab.box"


def up(args: argparse.Namespace) -> int:
    """Make the box ready: reach it, bootstrap it, write its ssh config entry.

    Bootstrap installs Docker (and the NVIDIA Container Toolkit on a GPU box) when missing and
    creates the persistent root. Re-running on a ready box changes nothing and takes seconds.

    Example:
      lenslab up
      lenslab up --json | jq .bootstrap.changed
    """
    from lenslab import sshconfig
    from lenslab.cli.labctx import bring_up
    from lenslab.providers.base import provider_for
    from lenslab.remote.bootstrap import bootstrap

    cfg = load_config(args)
    progress = Progress(quiet=args.json)
    provider = provider_for(cfg.box, assume_yes=args.yes)
    with progress.step(f"finding box {cfg.box.name} ({cfg.box.provider})"):
        box = provider.launch(cfg.box)
    _check_identity(box.identity_file, cfg.path)
    where = f"{box.user}@{box.host}:{box.port}" if box.host else "this machine"
    with progress.step(f"connecting to {where}"):
        runner = provider.connect(box, attempts=args.attempts)
    try:
        with progress.step("bootstrapping (Docker, GPU, persistent root)") as show:
            summary = bootstrap(runner, box.root, cfg.box.gpu, cfg.box.min_free_gb, on_output=_bootstrap_lines(show))
        if not args.no_containers:
            if any("to group" in change for change in summary.get("changed", [])):
                # A new group membership reaches only sessions opened after it was added.
                runner.close()
                runner = provider.connect(box, attempts=args.attempts)
            with progress.step("image and dev container") as show:
                summary["lab"] = bring_up(cfg, runner, summary.get("root") or box.root, show)
        with progress.step("autostop watcher"):
            autostop = _install_autostop(provider, cfg, box, runner)
        if autostop is not None:
            summary["autostop"] = autostop
    finally:
        runner.close()
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


def _install_autostop(provider: Any, cfg: Config, box: Box, runner: Runner) -> dict[str, Any] | None:
    """Install or update the box's idle watcher (see lenslab.remote.autostop for which boxes)."""
    from lenslab.remote import autostop

    inputs = getattr(provider, "autostop_inputs", None)
    launch, api_url, api_key = inputs(cfg.box) if inputs else (None, None, None)
    settings = autostop.watcher_config(cfg.box, box, launch, api_url)
    return None if settings is None else autostop.install(runner, settings, api_key)


def _bootstrap_lines(show: Callable[[str], None]) -> OutputSink:
    """Feeds the script's "bootstrap: ..." progress lines to the spinner as they arrive."""

    def sink(stream: str, text: str) -> None:
        for line in text.splitlines():
            if stream == "stdout" and line.startswith("bootstrap: "):
                show(line.removeprefix("bootstrap: "))

    return sink


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
        f"docker {summary.get('docker')}, root {summary.get('root')}",
        f"changed: {'; '.join(changed) if changed else 'nothing (already ready)'}",
    ]
    if box.host:
        lines += [f"shell:  ssh {box.alias}", "VSCode: lenslab code"]
    return "\n".join(lines)


def down(args: argparse.Namespace) -> int:
    """Stop lenslab's containers on the box and remove its ssh config entry; keep all data.

    The persistent root (workspace/, checkpoints/, hf-cache/, runs/) stays on the box. An
    unreachable box still loses its ssh entry, so `down` always succeeds.

    Example:
      lenslab down
    """
    from lenslab import sshconfig
    from lenslab.errors import HostUnreachable
    from lenslab.providers.base import provider_for

    cfg = load_config(args)
    progress = Progress(quiet=args.json)
    provider = provider_for(cfg.box)
    # get, not launch: `down` must never create the box it is asked to stand down.
    box = provider.get(cfg.box)
    if box is None:
        removed = sshconfig.remove(cfg.box.alias)
        purged = _purge(cfg, args) if args.purge else None
        emit(
            args,
            {"box": cfg.box.name, "running": False, "ssh_entry_removed": removed, "purged": purged},
            f"box {cfg.box.name} is not running; nothing to stop" + (f"; deleted {purged}" if purged else ""),
        )
        return 0
    stopped: list[str] = []
    reachable = True
    try:
        with progress.step("stopping lenslab containers"):
            runner = provider.connect(box, attempts=1)
            try:
                stopped = _stop_containers(runner, box.name)
            finally:
                runner.close()
    except HostUnreachable as exc:
        reachable = False
        progress.warn(f"{exc}; its containers were left as they are")
    provider.terminate(box)
    removed = sshconfig.remove(box.alias) if box.host else False
    purged = _purge(cfg, args) if args.purge else None
    kept = f"deleted {purged}" if purged else f"data kept in {box.root}"
    if box.provider == "lambda" and not purged:
        kept += " (the file system stays, billed by Lambda per GB-month; `lenslab down --purge` deletes it)"
    terminated = "terminated the instance, " if box.provider == "lambda" else ""
    emit(
        args,
        {
            "box": box.name,
            "reachable": reachable,
            "stopped": stopped,
            "ssh_entry_removed": removed,
            "terminated": box.provider == "lambda",
            "purged": purged,
        },
        f"box {box.name} is down: {terminated}stopped {len(stopped)} container(s)"
        f"{', removed ssh entry ' + box.alias if removed else ''}; {kept}",
    )
    return 0


def _purge(cfg: Config, args: argparse.Namespace) -> str | None:
    """Delete the lambda box's file system (all its data) after an explicit yes."""
    from lenslab.errors import ProviderError

    if cfg.box.provider != "lambda":
        raise ProviderError(
            f"--purge deletes a cloud file system; box {cfg.box.name} is {cfg.box.provider}",
            f"delete the data in {cfg.box.persistent_root} on the box yourself if you mean to",
        )
    from lenslab.providers.lambda_cloud.provider import client_from_environment

    client = client_from_environment()
    name = f"lenslab-{cfg.box.project or cfg.box.name}"
    fs = next((f for f in client.file_systems() if f.name == name), None)
    if fs is None:
        return None
    if not args.yes and not _ask(f"delete file system {name} in {fs.region} and ALL data on it? [y/N] "):
        raise ProviderError(f"file system {name} was not deleted", "re-run with --purge --yes to delete it")
    client.delete_file_system(fs.id)
    return f"file system {name}"


def _ask(question: str) -> bool:
    import sys

    return sys.stdin.isatty() and input(question).strip().lower() in ("y", "yes")


def _stop_containers(runner: Runner, name: str) -> list[str]:
    label = shlex.quote(f"label={BOX_LABEL}={name}")
    result = runner.run(
        f"command -v docker >/dev/null || exit 0; ids=$(docker ps -q --filter {label}); "
        '[ -z "$ids" ] || docker stop $ids',
        check=True,
    )
    return [line for line in result.stdout.split() if line]


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = add_command(commands, "up", up)
    parser.add_argument("--attempts", type=int, default=6, help="connection attempts while the box boots (default: 6)")
    parser.add_argument("--no-containers", action="store_true", help="bootstrap only: no image, no dev container")
    parser.add_argument("--yes", action="store_true", help="accept a cloud launch and its price without asking")
    parser = add_command(commands, "down", down)
    parser.add_argument("--purge", action="store_true", help="lambda: also delete the file system and its data")
    parser.add_argument("--yes", action="store_true", help="with --purge: delete without asking")
