"""``lenslab export skypilot RUN.toml``: a run as a task for another scheduler."""

from __future__ import annotations

import argparse
from pathlib import Path

from lenslab.cli.common import add_command, emit, load_config, run_name


def skypilot(args: argparse.Namespace) -> int:
    """Write a SkyPilot task that trains RUN.toml as a managed job, resumed exactly after preemption.

    The task takes its resources from lenslab.toml (provider as the cloud, gpu_types in order,
    regions, interruptible as use_spot, min_free_gb in its disk), installs lenslab from the
    sources it writes beside the task, and runs lenslab-train under a run name derived from
    SKYPILOT_TASK_ID, which a managed job keeps across recoveries: a job relaunched on a new
    machine restores the run's newest checkpoint from the runs mirror ([box] mirror, s3://).
    The mirror's credentials (box.mirror_env) are never written into the task: launch it with
    `--secret NAME` for each, and SkyPilot takes the values from your environment.
    SkyPilot itself is not needed to export (pip install 'lenslab[skypilot]' to launch).

    Example:
      lenslab export skypilot workspace/configs/tiny.toml -o tiny.sky.yaml
      sky jobs launch tiny.sky.yaml --secret AWS_ACCESS_KEY_ID --secret AWS_SECRET_ACCESS_KEY
    """
    from lenslab import runfile
    from lenslab.export import skypilot as sky_export

    run = runfile.load(Path(args.run_file), args.name)
    cfg = load_config(args)
    out = Path(args.output) if args.output else Path(f"{run.name}.sky.yaml")
    exported = sky_export.export(cfg, run, out, args.gpus)
    launch = exported.launch_command()
    emit(
        args,
        {"task": str(exported.task), "sources": str(exported.sources), "run_prefix": exported.run_prefix,
         "mirror": exported.mirror, "secrets": exported.secrets, "launch": launch},
        f"wrote {exported.task} (lenslab's sources for its setup: {exported.sources})\n"
        f"launch: {launch}\n"
        + ("the mirror's credentials are not in the task: each --secret takes its value from this shell\n"
           if exported.secrets else "")
        + f"a recovered job resumes run {exported.run_prefix}-<key of SKYPILOT_TASK_ID> from {exported.mirror}",
    )  # fmt: skip
    return 0


def _gpus(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 64:
        raise argparse.ArgumentTypeError(f"{value!r} is not a GPU count (1 to 64)")
    return int(value)


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    export = commands.add_parser("export", help="write a run as a task for another scheduler (SkyPilot)")
    # Subparsers are of the parent's class: their usage mistakes are one line too.
    targets = export.add_subparsers(dest="target", metavar="TARGET", required=True)
    parser = add_command(targets, "skypilot", skypilot)
    parser.add_argument("run_file", metavar="RUN.toml", help="the run file to train")
    parser.add_argument("-o", "--output", metavar="PATH", help="the task file to write (default: NAME.sky.yaml)")
    parser.add_argument("--name", type=run_name, help="the run's name (default: the file's name = ...)")
    parser.add_argument("--gpus", type=_gpus, default=1, help="GPUs per machine for each GPU type (default: 1)")
