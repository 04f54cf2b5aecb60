"""``lenslab eval NAME``: evaluate a run on the box and bring its report here.

``lenslab-eval`` runs in the box's dev container (where the run directory, the model and the
GPU are); its ``eval/`` directory is then copied to ``./runs/NAME/eval/``. Nothing the box
sends is believed: ``eval/`` must be a flat directory of regular files with simple names, each
no bigger than the box listed, and it replaces the local copy only once all of it arrived.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lenslab.cli.common import add_command, emit, load_config, run_name

if TYPE_CHECKING:
    from lenslab.remote.bootstrap import Runner

EVAL_DIR = "eval"
EVAL_USAGE_EXIT = 2  # lenslab-eval's exit code for a bad input (one line on stderr)


def evaluate(args: argparse.Namespace) -> int:
    """Evaluate a run's SAE on the box, then copy its report here (./runs/NAME/eval/).

    Runs lenslab-eval in the dev container on held-out tokens of the run's dataset: SAELens's
    metrics, feature statistics and top contexts, plots, and report.html (works offline).
    --open opens the report in a browser.

    Example:
      lenslab eval tiny --open
      lenslab eval gpt2-l8 --tokens 500000 --features 1000
    """
    from lenslab.errors import LenslabError
    from lenslab.remote import lab as labs
    from lenslab.remote.labsession import open_lab
    from lenslab.remote.training import Paths

    dest = Path(args.dest) if args.dest else Path("runs") / args.run_name
    with open_lab(load_config(args)) as session:
        container = labs.find(session.client, session.lab.dev_name())
        if container is None or container.status != "running":
            raise LenslabError(f"the dev container {session.lab.dev_name()} is not running", "run `lenslab up`")
        summary = _run_on_box(session.client, container.id, _command(args), quiet=args.json)
        local = pull_eval(session.runner, f"{Paths(session.lab.root, args.run_name).run_dir}/{EVAL_DIR}", dest)
    report = local / "report.html"
    emit(
        args,
        {"run": args.run_name, "path": str(local), "metrics": summary.get("metrics", {})},
        f"evaluated run {args.run_name}; report: {report}",
    )
    if args.open:
        import webbrowser

        webbrowser.open(report.resolve().as_uri())
    return 0


def _command(args: argparse.Namespace) -> list[str]:
    from lenslab.remote.lab import MOUNT_POINT

    command = ["lenslab-eval", f"{MOUNT_POINT}/runs/{args.run_name}", "--json"]
    for flag in ("tokens", "features", "dataset"):
        value = getattr(args, flag)
        if value is not None:
            command += [f"--{flag}", str(value)]
    return command


def _run_on_box(client: Any, container_id: str, command: list[str], quiet: bool) -> dict[str, Any]:
    """Run ``command`` in the container; its progress goes to our stderr, its JSON is returned."""
    from lenslab.errors import LenslabError
    from lenslab.remote.engine import engine_errors

    out: list[bytes] = []
    err: list[bytes] = []
    shown = _Relay(quiet)
    with engine_errors():
        exec_id = client.api.exec_create(container_id, command)["Id"]
        for stdout, stderr in client.api.exec_start(exec_id, stream=True, demux=True):
            if stdout:
                out.append(stdout)
            if stderr:
                err.append(stderr)
                shown.feed(stderr.decode(errors="replace"))
        code = client.api.exec_inspect(exec_id)["ExitCode"]
    if code != 0:
        lines = [line for line in b"".join(err).decode(errors="replace").splitlines() if line.strip()]
        last = lines[-1].removeprefix("lenslab-eval: error: ") if lines else f"exit {code}"
        error = LenslabError(f"lenslab-eval on the box failed: {last}", None)
        error.exit_code = 2 if code == EVAL_USAGE_EXIT else 1
        raise error
    try:
        summary: dict[str, Any] = json.loads(b"".join(out).decode())
    except ValueError as exc:
        raise LenslabError("lenslab-eval on the box printed no JSON summary", "run it again") from exc
    return summary


class _Relay:
    """The box's progress bars and notes, on our stderr as they come; its error line is left to
    the one line ``lenslab`` itself prints."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.pending = ""

    def feed(self, text: str) -> None:
        if self.quiet:
            return
        self.pending += text
        cut = max(self.pending.rfind("\n"), self.pending.rfind("\r")) + 1
        ready, self.pending = self.pending[:cut], self.pending[cut:]
        kept = [line for line in ready.split("\n") if not line.startswith("lenslab-eval: error:")]
        sys.stderr.write("\n".join(kept))
        sys.stderr.flush()


def pull_eval(runner: Runner, remote_dir: str, dest: Path) -> Path:
    """Copy the box's flat ``eval/`` to ``dest/eval``, refusing any odd entry before writing."""
    from lenslab import contract
    from lenslab.remote.pull import Listing, PullFailed, fetch_flat_dir, local_target

    found = runner.run(
        f"cd -- {shlex.quote(remote_dir)} 2>/dev/null || exit 3; find . -mindepth 1 -printf '%y %s %P\\0'"
    )
    if found.exit_status == 3:
        raise PullFailed(f"no {remote_dir} on the box", "lenslab-eval did not write it; run `lenslab eval` again")
    if found.exit_status != 0:
        # find lists what it could and fails on the rest: a partial listing is no listing.
        raise PullFailed(f"cannot list {remote_dir} on the box (exit {found.exit_status})", "run `lenslab eval` again")
    listing = Listing.parse(found.stdout.encode())
    files: dict[str, int] = {}
    for name, (kind, size) in listing.entries.items():
        if not contract.is_artifact_file_name(name):
            raise PullFailed(f"{remote_dir} holds {name[:80]!r}, not a simple file name", "nothing was copied")
        if kind != "f":
            raise PullFailed(f"{remote_dir}/{name} is not a regular file", "nothing was copied")
        files[name] = size
    if "report.html" not in files:
        raise PullFailed(f"{remote_dir} has no report.html", "run `lenslab eval` again")
    return fetch_flat_dir(runner, remote_dir, files, local_target(dest, EVAL_DIR), verify=lambda copied: None)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = add_command(commands, "eval", evaluate)
    parser.add_argument("run_name", metavar="NAME", type=run_name)
    parser.add_argument("--open", action="store_true", help="open report.html in a browser")
    parser.add_argument("--tokens", type=_positive, help="tokens to evaluate on (lenslab-eval's default: 100000)")
    parser.add_argument("--features", type=_positive, help="features with contexts in the report")
    parser.add_argument("--dataset", help="evaluate on this dataset (a path on the box or a Hugging Face name)")
    parser.add_argument("--dest", help="local directory of the run (default: ./runs/NAME)")
