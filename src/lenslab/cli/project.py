"""``lenslab init``: start a project."""

from __future__ import annotations

import argparse
from pathlib import Path

from lenslab.cli.common import add_command, box_name, emit


def init(args: argparse.Namespace) -> int:
    """Write a commented lenslab.toml here and make lenslab's SSH key.

    The key (~/.ssh/lenslab/id_ed25519, mode 0600) is what lenslab logs in with unless
    lenslab.toml names another box.identity_file; add its .pub to the box's authorized_keys.

    Example:
      lenslab init --name gpu1 --provider ssh
      lenslab init --name here --provider local --gpu optional
    """
    from lenslab import config, files, sshconfig
    from lenslab.errors import ConfigError

    path = Path(args.config) if args.config else Path.cwd() / config.CONFIG_NAME
    if path.exists() or path.is_symlink():
        raise ConfigError(f"{path} already exists", "edit it, or delete it to start over")
    # The key first: a HOME lenslab cannot write then fails before any lenslab.toml exists.
    files.ensure_dirs()
    key = sshconfig.ensure_keypair()
    config.write_starter(path, args.name, args.provider, args.gpu)
    emit(
        args,
        {"config": str(path), "key": str(key), "public_key": str(key) + ".pub"},
        f"wrote {path}\nlenslab's SSH public key: {key}.pub\nnext: edit [box] in lenslab.toml, then run `lenslab up`",
    )
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = add_command(commands, "init", init)
    parser.add_argument(
        "--name", type=box_name, default="gpu", help="box name; ssh alias lenslab-<name> (default: gpu)"
    )
    from lenslab.providers import registry

    names = registry.names()
    parser.add_argument(
        "--provider",
        choices=names,
        default=registry.DEFAULT_PROVIDER,
        help=f"where the box is: {', '.join(names)} (default: {registry.DEFAULT_PROVIDER})",
    )
    parser.add_argument("--gpu", choices=["required", "optional", "none"], default="optional")
