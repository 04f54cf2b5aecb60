"""``lenslab train``, ``runs``, ``logs``, ``stop``, ``pull``, ``jupyter``: the lab on the box."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from lenslab.cli.common import add_command, emit, load_config, run_name


def train(args: argparse.Namespace) -> int:
    """Start a training run on the box, detached: it survives a closed laptop or a dropped link.

    The run file is validated here first; a bad one uploads nothing. `train` returns once the
    trainer on the box has reported in (or says why it did not, with its last log lines). The
    run restarts itself after a crash and resumes from its newest checkpoint; the same name on
    a new box with the same persistent root continues it.

    Several run files are a sweep: on a Slurm cluster one job array, a task per run file (a
    group run file with a [sweep] grid is one run, so one task); elsewhere started in turn.

    Example:
      lenslab train workspace/configs/tiny.toml
      lenslab train run.toml --name sweep-1 && lenslab logs sweep-1 -f
      lenslab train sweep/*.toml
    """
    from lenslab import runfile, runmirror, runstart
    from lenslab.cli.common import one_line
    from lenslab.errors import ConfigError
    from lenslab.remote.labs import open_lab
    from lenslab.remote.training import RunDidNotStart

    if len(args.run_file) > 1 and args.name:
        raise ConfigError("--name names one run, but several run files were given", "set `name` in each run file")
    loaded = [runfile.load(Path(path), args.name) for path in args.run_file]
    if len({run.name for run in loaded}) != len(loaded):
        raise ConfigError("two of the run files have the same run name", "give each its own `name`")
    cfg = load_config(args)
    for run in loaded:
        runmirror.with_box_mirror(run, cfg.box)  # checked before connecting: a bad one uploads nothing
    runmirror.mirror_env(cfg.box)
    with open_lab(cfg) as lab:
        start_runs = getattr(lab, "start_runs", None)
        if start_runs is not None:  # a scheduler: the whole sweep is one submission
            prepared = [runstart.prepare_run(lab, run, cfg.box) for run in loaded]
            return _submitted(args, cfg.box.name, prepared, start_runs(prepared))
        if len(loaded) > 1:
            for run in loaded:
                runstart.start_run(lab, run, cfg.box)
            return _submitted(args, cfg.box.name, loaded, [f"run {run.name}" for run in loaded])
        run, runs_it = runstart.start_run(lab, loaded[0], cfg.box)  # as the watcher restarts it
        try:
            status = lab.wait_started(run.name, args.wait)
        except RunDidNotStart as exc:
            # One line, then what the run's container (or process) said last: usually the reason.
            print(f"lenslab: error: {one_line(str(exc))}", file=sys.stderr)
            for line in exc.tail:
                print(f"  | {line}", file=sys.stderr)
            return exc.exit_code
    resumed = status.get("resumed_from_step")
    how = f"resumed from step {int(resumed)}" if resumed is not None else str(status.get("state"))
    if status.get("state") == "finished":
        how = "it had finished already"
    elif status.get("state") == "queued":
        how = "queued: every GPU of the box is in use; it starts when one frees"
    mirror = runmirror.run_mirror(run)
    emit(
        args,
        {"run": run.name, "container": runs_it, "box": cfg.box.name, "state": status.get("state"),
         "resumed_from_step": resumed, "mirror": mirror},
        f"run {run.name} started on box {cfg.box.name} ({runs_it}, {how})\n"
        + (f"checkpoints mirrored to {mirror}\n" if mirror else "")
        + f"follow: lenslab logs {run.name} -f    status: lenslab runs    stop: lenslab stop {run.name}",
    )  # fmt: skip
    return 0


def _submitted(args: argparse.Namespace, box: str, started: list[Any], what: list[str]) -> int:
    """The runs of a sweep, submitted (a queue may hold them a while: `lenslab runs` follows them)."""
    emit(
        args,
        {"runs": [{"run": run.name, "container": it} for run, it in zip(started, what, strict=True)], "box": box},
        "\n".join(f"run {run.name}: {it}" for run, it in zip(started, what, strict=True))
        + f"\n{len(started)} run(s) submitted to box {box}; status: lenslab runs    follow: lenslab logs NAME -f",
    )
    return 0


def runs(args: argparse.Namespace) -> int:
    """List the runs on the box: state, progress, tokens/s, ETA, last checkpoint age.

    The state comes from the run's container when status.json cannot know it: a container
    that exited (with its exit code), keeps restarting, or is gone with its box.

    Example:
      lenslab runs
      lenslab runs --json | jq '.[].state'
    """
    from lenslab.remote.labs import open_lab
    from lenslab.watch import report

    cfg = load_config(args)
    with open_lab(cfg) as lab:
        found = lab.list_runs()
    if args.cost:
        return _costs(args, report.cost_rows(cfg.box.name, found))
    recoveries = report.recent(cfg.box.name)
    now = time.time()
    rows = [row for status in found for row in (_row(status, now), *((*r, "") for r in _sae_rows(status)))]
    header = ("RUN", "STATE", "PROGRESS", "TOK/S", "ETA", "CHECKPOINT", "GPU")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    text = "\n".join(
        "  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]
    )
    text = text if rows else "no runs on the box yet; start one with `lenslab train RUN.toml`"
    emit(args, {"runs": found, "recoveries": recoveries}, "\n".join([text, *report.lines(recoveries, "")]))
    return 0


def _costs(args: argparse.Namespace, rows: list[dict[str, Any]]) -> int:
    """`lenslab runs --cost`: each run's cost so far, and the same hours at on-demand prices."""
    table = [("RUN", "HOURS", "COST", "ON-DEMAND", "SAVED")] + [
        (str(r["run"]), f"{r['hours']:.2f}", f"${r['cost_usd']:.2f}", f"${r['on_demand_usd']:.2f}",
         f"{100 * (1 - r['cost_usd'] / r['on_demand_usd']):.0f}%" if r["on_demand_usd"] else "-")
        for r in rows
    ]  # fmt: skip
    widths = [max(len(r[i]) for r in table) for i in range(5)]
    text = "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in table)
    emit(args, {"costs": rows}, text if rows else "no runs on the box yet")
    return 0


def _row(status: dict[str, Any], now: float) -> tuple[str, ...]:
    state = run_state(status)
    done, total = status.get("tokens_done") or 0, status.get("tokens_total") or 0
    progress = f"{100 * done / total:.0f}% of {int(total):,}" if total else "-"
    rate = status.get("tokens_per_second")
    eta = status.get("eta_seconds")
    ckpt = status.get("last_checkpoint")
    ckpt_text = f"step {ckpt['step']}, {_age(now - ckpt['time'])} ago" if ckpt else "-"
    return (str(status.get("name")), state, progress, f"{rate:,.0f}" if rate else "-",
            _age(eta) if eta is not None and state == "running" else "-", ckpt_text, gpu_cell(status))  # fmt: skip


def gpu_cell(status: dict[str, Any]) -> str:
    """The GPU a live run uses (nvidia-smi's index), "queued" while it waits for one, else "-"
    (a box without GPUs, or a run that is not running)."""
    gpu = status.get("gpu")
    if not isinstance(gpu, dict):
        return "-"
    return "queued" if gpu.get("state") == "queued" else str(gpu.get("index"))


def _sae_rows(status: dict[str, Any]) -> list[tuple[str, ...]]:
    """A group run's SAEs, one indented row each: architecture/width, hook, latest MSE."""
    rows: list[tuple[str, ...]] = []
    for sae in status.get("saes") or []:
        mse = sae["losses"].get("mse_loss")
        rows.append((f"  {sae['name']}", f"{sae['architecture']}/{sae['d_sae']}", str(sae["hook_name"]), "", "",
                     f"mse {mse:.4g}" if isinstance(mse, int | float) else "-"))  # fmt: skip
    return rows


def run_state(status: dict[str, Any]) -> str:
    """What the run is doing, by its status.json and its container together: status.json says
    "running" forever when its container died, and nothing at all when it died starting."""
    state = str(status.get("state"))
    queued = status.get("scheduler")
    if isinstance(queued, dict):  # a batch scheduler's task: the queue's word and the trainer's, together
        return str(queued.get("shown"))
    container = status.get("container")
    if gpu_cell(status) == "queued":  # set only while its launch lives: it waits for a GPU
        return "queued"
    if container is None:
        return "lost" if state in ("running", "starting") else state
    restarts = f", restarted {container['restarts']}x" if container["restarts"] else ""
    # A status older than the container is the previous launch's: it says nothing of this one.
    current = (status.get("started_at") or 0) >= container["created"]
    if container["state"] == "restarting":
        return f"restarting (exit {container['exit_code']}{restarts})"
    if container["state"] in ("running", "created"):
        return (state if current else "starting") + (f" ({restarts[2:]})" if restarts else "")
    if not current:
        return f"exited ({container['exit_code']}) before starting"
    if state in ("running", "starting"):
        return f"exited ({container['exit_code']})"
    return state


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def logs(args: argparse.Namespace) -> int:
    """Print a run's log; with -f keep following it, reconnecting by itself after a dropped link.

    Example:
      lenslab logs tiny -f
    """
    from lenslab.remote.follow import Follower
    from lenslab.remote.labs import open_lab

    cfg = load_config(args)

    def warn(text: str) -> None:
        print(f"lenslab: {text}", file=sys.stderr, flush=True)

    return Follower(lambda: open_lab(cfg, attempts=1), args.run_name, on_reconnect=warn).run(args.follow)


def stop(args: argparse.Namespace) -> int:
    """Stop a run gracefully: it writes a checkpoint first; `lenslab train` continues it later.

    Example:
      lenslab stop tiny
    """
    from lenslab.contract import EXIT_INTERRUPTED
    from lenslab.errors import LenslabError
    from lenslab.remote.labs import open_lab

    with open_lab(load_config(args)) as lab:
        code = lab.stop_run(args.run_name)
    if code is None:
        raise LenslabError(f"run {args.run_name} is not running", "see the runs with `lenslab runs`")
    saved = code == EXIT_INTERRUPTED
    emit(args, {"run": args.run_name, "exit_code": code, "checkpoint_saved": saved},
         f"run {args.run_name} stopped" + (" with a checkpoint; `lenslab train` with the same name continues it"
                                      if saved else f" (exit {code})"))  # fmt: skip
    return 0


def pull(args: argparse.Namespace) -> int:
    """Copy a run's final SAE (or its newest checkpoint) here and verify it.

    Files land in ./runs/<name>/final (or ./runs/<name>/checkpoints/step-N); checkpoints are
    checked against their manifest's sha256s. Load the SAE with SAE.load_from_disk(path).

    Example:
      lenslab pull tiny
    """
    from lenslab.remote.labs import open_lab
    from lenslab.remote.pull import pull as pull_run
    from lenslab.remote.training import Paths

    dest = Path(args.dest) if args.dest else Path("runs") / args.run_name
    with open_lab(load_config(args)) as lab:
        local, what = pull_run(lab.runner, Paths(lab.lab.root, args.run_name).run_dir, dest)
    emit(
        args,
        {"run": args.run_name, "path": str(local), "source": what},
        f"pulled {what} of run {args.run_name} to {local}",
    )
    return 0


def jupyter(args: argparse.Namespace) -> int:
    """Tunnel to JupyterLab on the box (its dev container, or a process on a box without
    Docker) and print its URL (with the token).

    Jupyter listens only on the box's 127.0.0.1; this forwards a local port over the SSH link
    until Ctrl-C. --open also opens the URL in a browser.

    Example:
      lenslab jupyter --open
    """
    from lenslab.remote.labs import open_lab

    with open_lab(load_config(args)) as lab:
        port, token = lab.jupyter_access()
        forward = getattr(lab.runner, "forward", None)
        if forward is None:  # the local provider: Jupyter is already on this machine's loopback
            return _serve_url(args, port, token, None)
        with forward(args.port, "127.0.0.1", port) as tunnel:
            return _serve_url(args, tunnel.local_port, token, tunnel)


def _serve_url(args: argparse.Namespace, port: int, token: str, tunnel: Any) -> int:
    url = f"http://127.0.0.1:{port}/lab?token={token}"
    print(url, flush=True)
    if args.open:
        import webbrowser

        webbrowser.open(url)
    if tunnel is None:
        return 0
    print("lenslab: tunnel open; Ctrl-C to close it", file=sys.stderr, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = add_command(commands, "train", train)
    parser.add_argument("run_file", metavar="RUN.toml", nargs="+",
                        help="the run file (lenslab-train's format); several: a sweep")  # fmt: skip
    parser.add_argument("--name", type=run_name, help="run name (default: the file's `name`)")
    parser.add_argument("--wait", type=float, default=150.0, metavar="SECONDS",
                        help="how long to wait for the trainer to report in (default: 150)")  # fmt: skip
    parser = add_command(commands, "runs", runs)
    parser.add_argument("--cost", action="store_true", help="cost of each run so far, and the same hours on demand")
    parser = add_command(commands, "logs", logs, json_flag=False)
    parser.add_argument("run_name", metavar="NAME", type=run_name)
    parser.add_argument("-f", "--follow", action="store_true", help="keep following; reconnects by itself")
    parser = add_command(commands, "stop", stop)
    parser.add_argument("run_name", metavar="NAME", type=run_name)
    parser = add_command(commands, "pull", pull)
    parser.add_argument("run_name", metavar="NAME", type=run_name)
    parser.add_argument("--dest", help="local directory (default: ./runs/NAME)")
    parser = add_command(commands, "jupyter", jupyter, json_flag=False)
    parser.add_argument("--port", type=int, default=0, help="local port (default: any free one)")
    parser.add_argument("--open", action="store_true", help="open the URL in a browser")
