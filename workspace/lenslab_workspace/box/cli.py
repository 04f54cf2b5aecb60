"""``lenslab-box``: the commands the laptop runs on a box without a Docker engine.

Answers are JSON on stdout (the laptop checks them before use); errors are one line on stderr
with a non-zero exit (2 for bad input, 8 for a second start of a live run).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from lenslab.contract import LOG_FILE
from lenslab_workspace import __version__
from lenslab_workspace.box.layout import CONSOLE_FILE, BoxError, prepare, resolve_root, run_dir

FOLLOW_POLL_SECONDS = 0.25
_CHUNK = 65536


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lenslab-box", description="lenslab's lab on a box without Docker: supervised runs, Jupyter, sshd."
    )
    parser.add_argument("--version", action="version", version=f"lenslab-box {__version__}")
    parser.add_argument("--root", help="the persistent root (default: $LENSLAB_ROOT, else /lab)")
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start run NAME detached and supervised")
    start.add_argument("name", metavar="NAME")
    start.add_argument("run_file", metavar="RUN_FILE", type=Path)
    stop = sub.add_parser("stop", help="stop run NAME gracefully (it checkpoints) and wait")
    stop.add_argument("name", metavar="NAME")
    for name, text in (("runs", "every run with its status and supervisor"), ("facts", "GPUs, disk, uptime"),
                       ("prepare", "create the root's layout; a summary like bootstrap's")):  # fmt: skip
        sub.add_parser(name, help=text).add_argument("--json", action="store_true", help="JSON (the default)")
    jupyter = sub.add_parser("jupyter", help="ensure Jupyter on 127.0.0.1; print its port and token")
    jupyter.add_argument("--json", action="store_true", help="JSON (the default)")
    jupyter.add_argument("--port", type=int, default=8888, help="port for a new server (default: 8888)")
    logs = sub.add_parser("logs", help="print run NAME's console log from byte OFFSET")
    logs.add_argument("name", metavar="NAME")
    logs.add_argument("--offset", type=int, default=0)
    logs.add_argument("-f", "--follow", action="store_true", help="until the run's supervisor exits")
    serve = sub.add_parser("serve", help="a container box's start command: sshd, runs, signals")
    serve.add_argument("--no-sshd", action="store_true",
                       help="leave SSH to the image's own sshd (the provider's stock image)")  # fmt: skip
    place = sub.add_parser("place", help="run COMMAND on a GPU of its own, queued while every GPU is busy")
    place.add_argument("name", metavar="NAME")
    place.add_argument("argv", metavar="COMMAND", nargs=argparse.REMAINDER, help="after --")
    supervise = sub.add_parser("supervise", help=argparse.SUPPRESS)
    supervise.add_argument("name")
    supervise.add_argument("run_file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    root = resolve_root(args.root)
    # What a login to lenslab's own sshd gets (serve.py's SetEnv), for every process started from
    # here, whoever logged in: on a stock image the login is the image's root sshd, and models
    # downloaded without HF_HOME would land on the container's disk, lost with the instance.
    os.environ.setdefault("LENSLAB_ROOT", str(root))
    os.environ.setdefault("HF_HOME", str(root / "hf-cache"))
    try:
        return _dispatch(args, root)
    except BoxError as exc:
        print(f"lenslab-box: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        print(f"lenslab-box: error: {exc.strerror or exc} ({exc.filename or root})", file=sys.stderr)
        return 1


def _dispatch(args: argparse.Namespace, root: Path) -> int:
    from lenslab_workspace.box import facts, supervisor

    command = args.command
    if command == "start":
        state = supervisor.start(root, args.name, args.run_file)
        return _print({"run": args.name, "supervisor_pid": state.get("supervisor_pid")})
    if command == "stop":
        return _print(supervisor.stop(root, args.name))
    if command == "runs":
        return _print(facts.runs(root))
    if command == "facts":
        return _print(facts.facts(root))
    if command == "prepare":
        return _print(facts.prepare_summary(root, prepare(root)))
    if command == "jupyter":
        return _print(facts.jupyter(root, args.port))
    if command == "logs":
        return _logs(root, args.name, args.offset, args.follow)
    if command == "place":
        from lenslab_workspace.box.placement import exec_placed

        return exec_placed(root, args.name, args.argv)
    if command == "supervise":
        return supervisor.Supervisor(root, args.name, args.run_file).run()
    from lenslab_workspace.box.serve import Server

    return Server(root, sshd=not args.no_sshd).run()


def _print(data: Any) -> int:
    print(json.dumps(data))
    return 0


def _logs(root: Path, name: str, offset: int, follow: bool) -> int:
    """Bytes of the run's console log from ``offset`` (the laptop counts what it got, so a
    reconnect neither repeats nor skips); with ``follow``, until the supervisor has exited."""
    from lenslab_workspace.box import supervisor

    supervisor.check_name(name)
    path = run_dir(root, name) / CONSOLE_FILE
    if not path.is_file():
        path = run_dir(root, name) / LOG_FILE  # a run trained elsewhere: its trainer's own log
    if not path.is_file():
        raise BoxError(f"run {name} has no log on this box", 3)
    out = sys.stdout.buffer
    parent = os.getppid()
    with path.open("rb") as src:
        src.seek(max(0, offset))
        while True:
            running = follow and supervisor.is_alive(supervisor.read_state(root, name), name)
            # The SSH session that asked is gone (a dropped link): nobody reads any more.
            running = running and os.getppid() == parent
            chunk = src.read(_CHUNK)
            while chunk:
                out.write(chunk)
                chunk = src.read(_CHUNK)
            out.flush()
            if not running:
                return 0
            time.sleep(FOLLOW_POLL_SECONDS)
