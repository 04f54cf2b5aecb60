"""The ``lenslab`` command line.

This is the only place that turns exceptions into what a user sees: a ``LenslabError`` becomes
one line on stderr and its exit code, never a traceback. Command modules import their heavy
dependencies (paramiko, rich, pydantic) inside the command, so ``lenslab --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lenslab.cli import box, connect, project, status, train

_COMMAND_GROUPS = (project, box, status, connect, train)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lenslab",
        description="A GPU lab for mechanistic interpretability: provision a box, open it in "
        "VSCode, train SAEs that survive anything.",
        epilog="Start with `lenslab init`, then `lenslab up`. `lenslab COMMAND --help` for details.",
    )
    parser.add_argument("--config", metavar="PATH", help="lenslab.toml to use (default: nearest one)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for group in _COMMAND_GROUPS:
        group.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from lenslab.errors import LenslabError

    # paramiko imports invoke (~80 ms, most of its import time) only to evaluate `Match exec` in
    # ssh_config files, and it supports invoke being absent. lenslab never has paramiko parse an
    # ssh_config, so the CLI process (ours alone) skips it to keep `lenslab status` under 0.5 s.
    sys.modules.setdefault("invoke", None)  # type: ignore[arg-type]

    args = build_parser().parse_args(argv)
    try:
        code: int = args.run(args)
        return code
    except LenslabError as exc:
        print(f"lenslab: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("lenslab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
