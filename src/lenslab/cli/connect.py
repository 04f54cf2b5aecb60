"""``lenslab ssh`` and ``lenslab code``: get onto the box."""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from pathlib import Path

from lenslab.cli.common import add_command, emit, load_config


def ssh(args: argparse.Namespace) -> int:
    """Open a shell on the box, or run one command there and exit with its status.

    With a command, its output streams back and lenslab exits with the remote exit status.
    Without one, this runs your OpenSSH client on the alias `lenslab up` wrote.

    Example:
      lenslab ssh
      lenslab ssh -- nvidia-smi
    """
    from lenslab.providers.base import provider_for

    cfg = load_config(args)
    provider = provider_for(cfg.box)
    # get, not launch: only `up` creates (and bills) a box.
    box = provider.get(cfg.box)
    if box is None:
        from lenslab.errors import ProviderError

        raise ProviderError(f"box {cfg.box.name} is not running", "start it with `lenslab up`")
    command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not command:
        return _interactive(box.alias, box.host is not None)
    runner = provider.connect(box, attempts=1)
    try:
        result = runner.run(shlex.join(command), on_output=_passthrough)
    finally:
        runner.close()
    return result.exit_status


def _passthrough(stream: str, text: str) -> None:
    out = sys.stdout if stream == "stdout" else sys.stderr
    out.write(text)
    out.flush()


def _interactive(alias: str, remote: bool) -> int:
    if not remote:
        shell = os.environ.get("SHELL", "/bin/bash")
        os.execvp(shell, [shell])
    client = shutil.which("ssh")
    if client is None:
        from lenslab.errors import LenslabError

        raise LenslabError("no OpenSSH client (ssh) on PATH", f"install it, then run `ssh {alias}`")
    from lenslab import files

    # -F: OpenSSH finds "~/.ssh/config" through the passwd database, lenslab through $HOME;
    # naming the file keeps both on the same config (with the user's own settings in it).
    os.execv(client, [client, "-F", str(files.ssh_dir() / "config"), alias])
    return 0  # pragma: no cover - execv does not return


def code(args: argparse.Namespace) -> int:
    """Open VSCode on the box's workspace through Remote-SSH.

    Runs `code --remote ssh-remote+lenslab-<name> <root>/workspace`; prints that command when
    VSCode's `code` is not on PATH. Run `lenslab up` first: it writes the ssh alias.

    Example:
      lenslab code
      lenslab code --print
    """
    cfg = load_config(args)
    box = cfg.box
    root = box.persistent_root
    from lenslab.providers.registry import provider_class

    if provider_class(box.provider).capabilities.this_machine:
        workspace = str(Path(root).expanduser() / "workspace")
        command = ["code", workspace]
    else:
        from lenslab import sshconfig

        # VSCode expands nothing in the remote path, so "~" must go: `lenslab up` recorded the
        # root as the box resolved it; before that, assume the usual home directory.
        home = "/root" if box.user == "root" else f"/home/{box.user}"
        guess = root.replace("~", home, 1) if root.startswith("~") else root
        workspace = f"{(sshconfig.recorded_root(box.alias) or guess).rstrip('/')}/workspace"
        command = ["code", "--remote", f"ssh-remote+{box.alias}", workspace]
    exe = shutil.which("code")
    if exe is None or args.print:
        emit(args, {"command": command, "launched": False}, shlex.join(command))
        return 0
    os.execv(exe, [exe, *command[1:]])
    return 0  # pragma: no cover - execv does not return


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = add_command(commands, "ssh", ssh, json_flag=False)
    parser.add_argument("cmd", nargs=argparse.REMAINDER, help="command to run on the box (after --)")
    parser = add_command(commands, "code", code)
    parser.add_argument("--print", action="store_true", help="print the command instead of running it")
