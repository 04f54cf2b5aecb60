"""``lenslab-train RUN.toml``: train an SAE that survives crashes, kills and lost machines.

Exit codes: 0 finished (or already finished), 75 interrupted by a signal with a checkpoint
saved (run the same command to continue), 2 a problem with the run file or the data,
1 a failure during training, 130 a second signal (exit at once; nothing is corrupted).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from lenslab_workspace.train.errors import LenslabTrainError

EPILOG = """\
examples:
  lenslab-train workspace/configs/tiny.toml            # start, or continue where it stopped
  lenslab-train run.toml --runs-dir /persist/runs      # runs live on the persistent disk
  lenslab-train run.toml --fresh                       # start over; the old run is kept aside

Re-running the same command after a crash, Ctrl-C, SIGKILL or on a new machine (with the
same runs directory or a mirror) continues from the newest valid checkpoint.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lenslab-train",
        description="Train a sparse autoencoder with SAELens, with crash-safe checkpoints and exact resume.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_file", type=Path, help="the run's TOML file (SAELens fields + [resilience])")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"), help="where runs live (default: ./runs)")
    parser.add_argument("--fresh", action="store_true", help="start over; the existing run is renamed, not deleted")
    return parser


def setup_logging() -> None:
    # A log file on a full disk must not print tracebacks over the one-line error.
    logging.raiseExceptions = False
    logger = logging.getLogger("lenslab.train")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if not logger.handlers:
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        logger.addHandler(console)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    # Imported here so that `--help` and argument errors answer at once.
    from lenslab_workspace.train.config import load_run_file
    from lenslab_workspace.train.runner import EXIT_FAILED, train

    try:
        settings = load_run_file(args.run_file)
        outcome = train(settings, args.runs_dir, fresh=args.fresh)
    except LenslabTrainError as exc:
        print(f"lenslab-train: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        print(f"lenslab-train: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_FAILED
    print(f"lenslab-train: {outcome.message}", file=sys.stderr)
    return outcome.exit_code


if __name__ == "__main__":
    sys.exit(main())
