"""``lenslab-train RUN.toml``: train an SAE that survives crashes, kills and lost machines.

Exit codes (lenslab.contract): 0 finished (or already finished), 75 interrupted by a signal
with a checkpoint saved (run the same command to continue), 2 a problem with the run file,
the data or ``--runs-dir``, 1 a failure during training, 130 a second signal (exit at once;
nothing is corrupted). Every error is one line on stderr; an unexpected one also names the
log file that holds its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from lenslab.contract import EXIT_FAILED
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


class StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is now (it may be replaced after setup)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:
            self.handleError(record)


def setup_logging() -> None:
    # A log file on a full disk must not print tracebacks over the one-line error.
    logging.raiseExceptions = False
    logger = logging.getLogger("lenslab.train")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if not any(isinstance(h, StderrHandler) for h in logger.handlers):
        console = StderrHandler()
        console.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        logger.addHandler(console)
    if not sys.stderr.isatty():
        # Progress bars (SAELens's norm estimate, datasets) redraw with carriage returns,
        # which a log file or `docker logs` shows as garbage; lenslab logs progress lines.
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        # datasets reads that variable once, at import: a process that already imported it
        # (a notebook, a test session) needs the switch itself.
        if "datasets" in sys.modules:
            sys.modules["datasets"].disable_progress_bars()
    # datasets logs a failed load itself, at ERROR, to stderr; lenslab's one line already gives
    # the reason, so its logger is silenced (read once, at import: a loaded one is set directly).
    os.environ.setdefault("DATASETS_VERBOSITY", "critical")
    if "datasets" in sys.modules:
        sys.modules["datasets"].utils.logging.set_verbosity(logging.CRITICAL)
    # Library warnings go to train.log (the run attaches it), not over the one-line error.
    logging.captureWarnings(True)
    warnings_log = logging.getLogger("py.warnings")
    warnings_log.propagate = False
    if not warnings_log.handlers:
        warnings_log.addHandler(logging.NullHandler())


def fail(message: str) -> None:
    print(f"lenslab-train: error: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        # Imported here so that `--help` and argument errors answer at once.
        from lenslab_workspace.train.config import load_run_file
        from lenslab_workspace.train.runner import train

        settings = load_run_file(args.run_file)
        if settings.resilience.mirror:
            from lenslab_workspace.train import mirror_env

            mirror_env.apply(args.run_file)  # the mirror's credentials, before it is opened
        outcome = train(settings, args.runs_dir, fresh=args.fresh)
    except LenslabTrainError as exc:
        fail(str(exc))
        return exc.exit_code
    except Exception as exc:  # the edge: anything unexpected is one line plus where its traceback is
        from lenslab_workspace.train.launch import write_crash_log

        crash = write_crash_log(exc, None)
        fail(f"unexpected {type(exc).__name__}: {' '.join(str(exc).split())[:300]} (traceback in {crash})")
        return EXIT_FAILED
    print(f"lenslab-train: {outcome.message}", file=sys.stderr)
    return outcome.exit_code


if __name__ == "__main__":
    sys.exit(main())
