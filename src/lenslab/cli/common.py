"""What every command shares: registering with its docstring as help, loading the config,
showing progress (rich, on stderr, only for humans) and printing results (text or ``--json``)."""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from lenslab.config import Config

Command = Callable[[argparse.Namespace], int]


def add_command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    func: Command,
    *,
    json_flag: bool = True,
) -> argparse.ArgumentParser:
    """A subcommand whose help is ``func``'s docstring (first line: summary; the rest: details)."""
    doc = inspect.getdoc(func) or ""
    parser = commands.add_parser(
        name,
        help=doc.splitlines()[0] if doc else None,
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if json_flag:
        parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.set_defaults(run=func)
    return parser


def load_config(args: argparse.Namespace) -> Config:
    from lenslab import config

    return config.load(Path(args.config) if args.config else None)


class Progress:
    """Steps shown with a rich spinner on stderr; silent when output is JSON or not a terminal."""

    def __init__(self, quiet: bool) -> None:
        # Scripts and pipes get clean output: errors and warnings only, one line each.
        self.quiet = quiet
        self.timings: dict[str, float] = {}  # seconds per step, for --json and benchmarks
        self._console: Any = None
        if not quiet and sys.stderr.isatty():
            from rich.console import Console

            self._console = Console(stderr=True, highlight=False)

    @contextmanager
    def step(self, text: str) -> Iterator[Callable[[str], None]]:
        """A spinner for one step; the yielded function shows what the step is doing now."""
        start = time.monotonic()
        try:
            if self._console is None:
                yield lambda detail: None
                return
            with self._console.status(text) as spinner:
                yield lambda detail: spinner.update(f"{text}: {detail}")
            self._console.print(f"[green]✓[/] {text} [dim]({time.monotonic() - start:.1f}s)[/]")
        finally:
            self.timings[text] = round(time.monotonic() - start, 3)

    def warn(self, text: str) -> None:
        if self._console is not None:
            self._console.print(f"[yellow]warning:[/] {text}")
        elif not self.quiet:
            print(f"lenslab: warning: {text}", file=sys.stderr)


def emit(args: argparse.Namespace, data: dict[str, Any], text: str) -> None:
    if getattr(args, "json", False):
        json.dump(data, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        print(text)


class OneLineParser(argparse.ArgumentParser):
    """argparse, with a usage mistake said in one line (as every other lenslab error is)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"lenslab: error: {one_line(message)}; see `{self.prog} --help`\n")


def one_line(text: str) -> str:
    """``text`` with line breaks and other control characters escaped: whatever a message
    quotes (a value from a file, a name the box printed) cannot add lines or move the cursor."""
    from lenslab.values import bad_char

    if bad_char(text) is None:
        return text
    return "".join(ch if bad_char(ch) is None else (ascii(ch)[1:-1]) for ch in text)


def run_name(value: str) -> str:
    """argparse ``type=`` for a run name: the one pattern the box uses for directories too."""
    from lenslab import contract

    if not contract.is_run_name(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a run name ({contract.RUN_NAME_HELP})")
    return value


def box_name(value: str) -> str:
    from lenslab import values

    if values.BOX_NAME.fullmatch(value) is None:
        raise argparse.ArgumentTypeError(f"{value!r} is not a box name ({values.BOX_NAME_HELP})")
    return value
