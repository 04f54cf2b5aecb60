"""``lenslab-eval RUN_DIR``: is this SAE any good, and what do its features mean?

Writes RUN_DIR/eval/: metrics.json (SAELens's evaluation metrics, dead/dense fractions,
tokens, versions), features.parquet (or .jsonl), PNG plots and report.html (offline).
Exit codes: 0 done, 2 bad input (one line on stderr), 1 a failure while evaluating.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from lenslab.contract import EXIT_FAILED

EVAL_DIR = "eval"
METRICS_FILE = "metrics.json"

EPILOG = """\
examples:
  lenslab-eval runs/tiny                          # final/ SAE, 100k held-out tokens
  lenslab-eval runs/tiny --tokens 200000 --json   # a JSON summary on stdout
  lenslab-eval runs/gpt2 --dataset NeelNanda/pile-10k --features 500
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lenslab-eval",
        description="Evaluate a trained SAE and write an offline report of its features to RUN_DIR/eval/.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dir", type=Path, help="the run's directory (runs/<name>)")
    parser.add_argument("--sae", type=Path, help="an SAE directory (default: final/, else the newest checkpoint)")
    parser.add_argument("--tokens", type=_positive, default=100_000, help="tokens to evaluate on (default 100000)")
    parser.add_argument("--features", type=_positive, default=256, help="features with contexts in the report")
    parser.add_argument("--top-k", type=_positive, default=10, help="top activating contexts per feature")
    parser.add_argument("--dataset", help="evaluate on this dataset (path or Hugging Face name) instead")
    parser.add_argument("--batch-size", type=_positive, help="sequences per forward pass (default: the run's)")
    parser.add_argument("--device", help="torch device (default: the run's, or cpu without CUDA)")
    parser.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def setup_logging() -> None:
    logging.raiseExceptions = False
    logger = logging.getLogger("lenslab.eval")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if not logger.handlers:
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter("lenslab-eval: %(message)s"))
        logger.addHandler(console)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    # Library chatter (deprecations, hub hints) would bury the one line that matters.
    warnings.filterwarnings("ignore")
    from lenslab_workspace.train.errors import LenslabTrainError

    try:
        summary = evaluate(args)
    except LenslabTrainError as exc:
        print(f"lenslab-eval: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        print(f"lenslab-eval: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("lenslab-eval: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as exc:  # the edge: anything unexpected is one line plus where its traceback is
        from lenslab_workspace.train.launch import write_crash_log

        crash = write_crash_log(exc, None, prefix="lenslab-eval-")
        message = " ".join(str(exc).split())[:300]
        print(
            f"lenslab-eval: error: unexpected {type(exc).__name__}: {message} (traceback in {crash})", file=sys.stderr
        )
        return EXIT_FAILED
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"lenslab-eval: wrote {summary['eval_dir']} (open report.html in a browser)", file=sys.stderr)
    return 0


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    from lenslab_workspace.analysis import runs

    log = logging.getLogger("lenslab.eval")
    root = args.run_dir
    if not root.is_dir():
        raise runs.EvalError(f"unknown run: no directory {root}; pass the run's directory, e.g. runs/<name>")
    if not (root / "run-config.json").is_file():
        raise runs.EvalError(f"{root} is not a lenslab run (no run-config.json); pass runs/<name>")
    sae_path = runs.find_sae(root, args.sae)
    _quiet_libraries()
    started = time.monotonic()
    run = runs.open_run(root, args.device)
    tokens = runs.eval_tokens(run, args.tokens, args.dataset)
    sae, scaler = runs.load_sae(sae_path, run.device)
    log.info("evaluating %s (%s)", sae_path, tokens.source)
    tmp = root / f".{EVAL_DIR}-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        summary = _write_outputs(args, run, sae, scaler, sae_path, tokens, tmp)
        summary["seconds"] = round(time.monotonic() - started, 2)
        _write_json(tmp / METRICS_FILE, summary)
        target = root / EVAL_DIR
        # Replaced whole, so a failed evaluation never leaves a mix of old and new files.
        if target.exists():
            shutil.rmtree(target)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary["eval_dir"] = str(target)
    summary["files"] = sorted(p.name for p in target.iterdir())
    return summary


def _write_outputs(args: argparse.Namespace, run: Any, sae: Any, scaler: Any, sae_path: Path, tokens: Any,
                   out: Path) -> dict[str, Any]:  # fmt: skip
    from lenslab_workspace.analysis import evaluate as ev
    from lenslab_workspace.analysis import features, plots, report, runs

    batch_size = args.batch_size or int(run.runner.get("store_batch_size_prompts", 32))
    rows, batch_size = ev.whole_batches(tokens.rows, batch_size)
    ignore = runs.special_tokens(run)
    metrics = ev.saelens_metrics(sae, run.model, scaler, rows, batch_size, ignore, run.device, verbose=True)
    found = features.feature_pass(run.model, sae, scaler, rows, args.top_k, ignore, batch_size, progress=True)
    metrics.update(ev.feature_fractions(found.stats.density))
    chosen = features.choose_features(found.stats, args.features)
    records = features.feature_records(run.model, sae, scaler, run.tokenizer, rows, found, chosen, batch_size)
    features_file = features.write_features(records, out)
    pngs = plots.write_plots(out, found.stats.density, found.l0, found.activations, found.sampled)
    summary: dict[str, Any] = {
        "run": run.settings.name,
        "sae": str(sae_path),
        "hook_name": sae.cfg.metadata.hook_name,
        "tokens_source": tokens.source,
        "held_out": tokens.held_out,
        "dense_threshold": ev.DENSE_THRESHOLD,
        "metrics": metrics,
        "features_file": features_file.name,
        "features_with_contexts": len(chosen),
        "versions": ev.versions(),
    }
    report.write_report(out, summary, records, pngs)
    return summary


def _quiet_libraries() -> None:
    import datasets
    import huggingface_hub

    # CRITICAL: datasets logs a failed load at ERROR, over lenslab-eval's own one line.
    datasets.utils.logging.set_verbosity(logging.CRITICAL)
    datasets.disable_progress_bars()  # "Generating train split" bars are not ours to show
    huggingface_hub.utils.logging.set_verbosity_error()  # type: ignore[no-untyped-call]


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    sys.exit(main())
