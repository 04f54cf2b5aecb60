"""``lenslab watch``: keeps a box's runs going through preemptions until they finish."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lenslab.cli.common import add_command, emit, load_config


def watch(args: argparse.Namespace) -> int:
    """Keep the box's runs going until they finish, through preemptions, with no one watching.

    Every 15 s it asks the provider about the box's instance and knocks on its SSH port. When the
    instance was preempted, stopped, terminated, or failed 3 knocks in a row over 45 s, it asks
    for it back where the provider keeps it (up to box.resume_wait_minutes), else launches the cheapest
    matching offer (box.interruptible, max_price_per_hour, budget_usd), and restarts the runs it
    watches: they resume from their newest checkpoint, exactly. With box.mirror set, that offer
    may be on any provider with an API key here: the box moves there (its runs come back from the
    mirror) and `status`, `runs`, `ssh`, `pull` and `down` find it there. It watches the RUN.toml files
    named here and every unfinished run it finds on the box. Each preemption and recovery is
    shown by `lenslab runs` and `lenslab status`. One watcher per box. It relaunches with no
    one to ask, so it needs box.budget_usd: the cap on what the box may spend.

    Example:
      lenslab train run.toml && lenslab watch --detach
      lenslab watch --stop
    """
    from lenslab.watch import command, detach
    from lenslab.watch import state as states

    cfg = load_config(args)
    box = cfg.box.name  # the state, log and events are the box's: so is its one watcher
    if args.stop:
        pid = detach.stop(box)
        emit(args, {"stopped": pid}, f"stopped the watcher (pid {pid})" if pid else "no watcher is running")
        return 0
    if args.log:
        print(states.log_path(box))
        return 0
    provider = command.watchable(cfg)
    runs = [command.told(Path(p)) for p in args.run_files]
    if args.detach:
        extra = [*(str(Path(p).resolve()) for p in args.run_files), "--poll-seconds", str(args.poll_seconds)]
        pid = detach.start(box, cfg.path, extra)
        emit(args, {"pid": pid, "log": str(states.log_path(box))},
             f"watching box {box} in the background (pid {pid})\n"
             f"log: {states.log_path(box)}    stop: lenslab watch --stop")  # fmt: skip
        return 0
    lock = states.take_lock(box)
    try:
        return command.foreground(cfg, provider, runs, args.poll_seconds, _say)
    finally:
        lock.close()


def _say(text: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {text}", flush=True)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.1 <= value <= 600:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds from 0.1 to 600")
    return value


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = add_command(commands, "watch", watch)
    parser.add_argument("run_files", nargs="*", metavar="RUN.toml", help="runs to keep going (besides those found)")
    parser.add_argument("--detach", action="store_true", help="watch in the background (log under ~/.local/state)")
    parser.add_argument("--stop", action="store_true", help="stop the box's background watcher")
    parser.add_argument("--log", action="store_true", help="print where the background watcher logs")
    parser.add_argument("--poll-seconds", type=_seconds, default=15.0, metavar="SECONDS",
                        help="how often to look at the instance (default: 15)")  # fmt: skip
