"""The ``lenslab`` command line.

This is the only place that turns exceptions into what a user sees: a ``LenslabError`` becomes
one line on stderr and its exit code, never a traceback. Anything else is a bug: one line that
says so and names a log file holding the traceback (under ``$XDG_STATE_HOME/lenslab``), exit 1.
Command modules import their heavy dependencies (paramiko, rich, pydantic) inside the command,
so ``lenslab --help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from lenslab.cli import box, common, connect, export, offers, project, status, train, watch
from lenslab.cli import eval as evaluation

_COMMAND_GROUPS = (project, box, status, offers, connect, train, evaluation, watch, export)


def build_parser() -> argparse.ArgumentParser:
    parser = common.OneLineParser(
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
        print(f"lenslab: error: {common.one_line(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("lenslab: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the edge: anything unforeseen is one line and a log, not a traceback
        print(f"lenslab: error: {common.one_line(_unexpected(exc))}", file=sys.stderr)
        return 1


def state_dir() -> Path:
    """Where lenslab keeps logs about itself (XDG base directories; relative values are ignored)."""
    xdg = os.environ.get("XDG_STATE_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".local" / "state"
    return base / "lenslab"


def _unexpected(exc: Exception) -> str:
    import traceback

    first = (str(exc).strip().splitlines() or [""])[0][:200]
    what = f"unexpected {type(exc).__name__}" + (f": {first}" if first else "")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    try:
        directory = state_dir()
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        log = directory / f"crash-{stamp}-{os.getpid()}.log"
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(f"lenslab {' '.join(sys.argv[1:])}\n")
            handle.write("".join(traceback.format_exception(exc)))
    except OSError as log_error:
        return f"{what} (a bug in lenslab; its traceback could not be saved: {log_error.strerror})"
    return f"{what}; this is a bug in lenslab: the traceback is in {log}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
