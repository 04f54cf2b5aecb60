"""``[logger] log_to_wandb = true``: SAELens's wandb metrics, one wandb run per lenslab run.

The same records at the same steps as ``SAETrainer.fit``: the train-step metrics every
``wandb_log_frequency`` steps, the feature-sparsity window when it resets (and the last one at
the end), the SAE's histograms every ``wandb_log_frequency * eval_every_n_wandb_logs`` steps,
and the final SAE as artifacts. All records of one step go to wandb as one history row.

One run, across kills and machines: the wandb run id is made once and kept in the run
directory (``wandb-run.json``) and in every checkpoint (``wandb.json``, so a run restored from
a mirror keeps it); every launch calls ``wandb.init(id=..., resume="allow")``.

One record per step, across kills. A SIGKILL keeps only two things: the newest checkpoint
(step C) and whatever wandb had written when the process died (through step L). wandb drops the
last records it was sent but had not written yet (measured offline: the last second or two of
training), so L may be below or above C, and nothing this process writes itself can say which:
only wandb knows L. So each launch asks it:
  - online, wandb's resume state from its server (``run.starting_step`` is L + 1);
  - offline, the transaction logs of the earlier launches of this run id under ``<run>/wandb``,
    read with wandb's own reader (``wandb-core leet inspect --json``).
Then: the records of steps in (L, C) come from the checkpoint, which keeps the last
``TAIL_RECORDS`` records it covers (they were computed before the kill and will not be computed
again); training resumes at C and replays steps C, C+1, ... bit for bit, and a replayed step is
sent only when it is above L (below it, wandb has the very same values already). wandb's step
axis therefore has each logged step exactly once, with no gap, whatever the kill point; the
one exception, a kill that lost more records than the tail holds, is named in a warning.

wandb is optional: imported only here and only when ``log_to_wandb`` is true. An unreachable
service (or no API key) never stops training: the run goes on offline with a one-line warning.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import re
import subprocess
from collections import deque
from pathlib import Path
from typing import Any

from lenslab_workspace.train.atomic import write_json_atomic
from lenslab_workspace.train.checkpoint import Snapshot
from lenslab_workspace.train.errors import RunConfigError

log = logging.getLogger("lenslab.train")

ID_FILE = "wandb-run.json"  # in the run directory
CHECKPOINT_FILE = "wandb.json"  # in each checkpoint
TAIL_RECORDS = 1000
# An online start that cannot reach the service gives up after this long and goes offline.
INIT_TIMEOUT_SECONDS = 30.0
INSTALL_HINT = "install it with: pip install 'lenslab-workspace[wandb]' (or set logger.log_to_wandb = false)"
# What lenslab does with each field of SAELens's LoggingConfig (the [logger] table).
LOGGER_HONOURED = {
    "log_to_wandb": "SAETrainer's records go to wandb, resumed across launches",
    "log_weights_to_wandb": "the final SAE's weights go into its wandb model artifact",
    "wandb_project": "passed to wandb.init",
    "wandb_entity": "passed to wandb.init",
    "run_name": "passed to wandb.init (SAELens's default name when unset)",
    "wandb_id": "the wandb run id, kept for every launch of the run",
    "wandb_log_frequency": "train-step records every this many steps",
    "eval_every_n_wandb_logs": "the SAE's histograms every this many records (SAELens's model evals are not run)",
}
# Fields whose SAELens behaviour lenslab does not reproduce; refused when set to true.
LOGGER_REFUSED = {
    "log_activations_store_to_wandb": "not supported by lenslab-train; set it to false",
    "log_optimizer_state_to_wandb": "not supported by lenslab-train; set it to false",
}
# wandb refuses ids with these characters (they are path and URL separators).
WANDB_ID = re.compile(r"[^/\\#?%:\s]{1,128}")
HISTOGRAM = "__histogram__"


def check_logger_fields(source: Path, fields: dict[str, Any]) -> None:
    """Refuse, in one line, the logger settings lenslab cannot honour (run file checks)."""
    for key, why in LOGGER_REFUSED.items():
        if fields.get(key):
            raise RunConfigError(f"{source}: field 'logger.{key}': {why}")
    for key in ("wandb_log_frequency", "eval_every_n_wandb_logs"):
        if key in fields and not fields[key] > 0:
            raise RunConfigError(f"{source}: field 'logger.{key}': must be positive (got {fields[key]!r})")
    wandb_id = fields.get("wandb_id")
    if wandb_id is not None and not WANDB_ID.fullmatch(wandb_id):
        raise RunConfigError(
            f"{source}: field 'logger.wandb_id': {wandb_id!r} is not a wandb run id (1-128 characters, "
            "no spaces or / \\ # ? % :)"
        )
    if fields.get("log_to_wandb") and importlib.util.find_spec("wandb") is None:
        raise RunConfigError(
            f"{source}: field 'logger.log_to_wandb': the wandb package is not installed; {INSTALL_HINT}"
        )


def import_wandb() -> Any:
    try:
        import wandb
    except ImportError as exc:
        raise RunConfigError(f"logger.log_to_wandb: the wandb package is not installed; {INSTALL_HINT}") from exc
    return wandb


def _to_plain(value: Any) -> Any:
    """A record value as JSON (a histogram as its counts and bin edges), for the checkpoint."""
    if hasattr(value, "histogram") and hasattr(value, "bins"):
        return {HISTOGRAM: [list(value.histogram), list(value.bins)]}
    return value


def _to_wandb(wandb: Any, value: Any) -> Any:
    if isinstance(value, dict) and HISTOGRAM in value:
        counts, bins = value[HISTOGRAM]
        return wandb.Histogram(np_histogram=(counts, bins))
    return value


def read_checkpoint_file(checkpoint: Path | None) -> dict[str, Any]:
    """What a checkpoint remembers of wandb: the run id and the tail of records."""
    if checkpoint is None:
        return {}
    try:
        data = json.loads((checkpoint / CHECKPOINT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def choose_run_id(logger_fields: dict[str, Any], run_root: Path, saved: dict[str, Any]) -> str:
    """The run's wandb id: the run file's ``wandb_id``, else the one kept, else a new one."""
    run_id = logger_fields.get("wandb_id")
    if run_id is None:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            run_id = json.loads((run_root / ID_FILE).read_text(encoding="utf-8")).get("run_id")
    if not isinstance(run_id, str) or not WANDB_ID.fullmatch(run_id):
        run_id = saved.get("run_id")
    if not isinstance(run_id, str) or not WANDB_ID.fullmatch(run_id):
        from wandb.sdk.lib.runid import generate_id

        run_id = generate_id()
    write_json_atomic(run_root / ID_FILE, {"run_id": run_id})
    return run_id


def last_step_in_transaction_logs(wandb_dir: Path, run_id: str, covered: int) -> int:
    """The highest step in the earlier launches' .wandb files of ``run_id`` (-1 if none),
    read with wandb's own reader; a file cut short by a kill is read up to where it ends.
    A file that cannot be read is taken to hold the steps below ``covered`` (the checkpoint's)."""
    from wandb.util import get_core_path

    last = -1
    for path in sorted(wandb_dir.glob(f"*-{run_id}/run-{run_id}.wandb")):
        args = [get_core_path(), "leet", "inspect", "--no-observability", "--json", "--run-file", str(path)]
        try:
            out = subprocess.run([*args, str(wandb_dir)], capture_output=True, text=True, timeout=120).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning("wandb: cannot read %s (%s); it is assumed to hold the steps the checkpoint covers", path, exc)
            last = max(last, covered - 1)
            continue
        for line in out.splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
                record = json.loads(line)
                if record.get("type") == "history":
                    last = max(last, int(record["history"]["step"]["num"]))
    return last


class WandbLog:
    """Sends a run's records to wandb: at most once per step, and only steps wandb lacks."""

    def __init__(self, wandb: Any, run: Any, logged_through: int, fields: dict[str, Any]) -> None:
        self.wandb, self.run = wandb, run
        self.logged_through = logged_through  # wandb has every step up to here
        self.frequency = int(fields.get("wandb_log_frequency", 10))
        self.eval_every = self.frequency * int(fields.get("eval_every_n_wandb_logs", 100))
        self.tail: deque[tuple[int, dict[str, Any]]] = deque(maxlen=TAIL_RECORDS)
        self.evicted_through = -1  # the newest step whose record no longer fits in the tail
        self.failed = False

    def log_step(self, trainer: Any, output: Any, sparsity_log: dict[str, Any]) -> None:
        """After ``trainer.step``, before ``n_training_steps`` advances (as ``SAETrainer.fit``)."""
        step = trainer.n_training_steps
        record = dict(sparsity_log)
        if (step + 1) % self.frequency == 0:
            record.update(
                trainer.build_train_step_log_dict(output=output, n_training_samples=trainer.n_training_samples)
            )
        if (step + 1) % self.eval_every == 0:
            # SAETrainer._run_and_log_evals without an evaluator: the SAE's histograms.
            for key, value in trainer.sae.log_histograms().items():
                record[key] = self.wandb.Histogram(value)
        self.send(step, record)

    def log_last_window(self, trainer: Any) -> None:
        """The sparsity window open at the end (``SAETrainer.fit`` logs it before folding)."""
        self.send(trainer.n_training_steps, trainer.full_sparsity_window_log())

    def send(self, step: int, record: dict[str, Any]) -> None:
        if not record:
            return
        plain = {key: _to_plain(value) for key, value in record.items()}
        if len(self.tail) == self.tail.maxlen:
            self.evicted_through = self.tail[0][0]
        self.tail.append((step, plain))
        if step > self.logged_through and not self.failed:  # a replayed step wandb has is not sent again
            try:
                self.run.log({key: _to_wandb(self.wandb, value) for key, value in plain.items()}, step=step)
            except Exception as exc:  # wandb broke mid-run: training goes on without it
                self.failed = True
                log.warning("wandb: logging failed at step %d (%s); training goes on without wandb", step, _reason(exc))
            self.logged_through = step

    def add_to(self, snapshot: Snapshot) -> None:
        """Put the run id and the newest records into the checkpoint being taken."""
        content = {
            "run_id": self.run.id,
            "evicted_through": self.evicted_through,
            "tail": [[step, record] for step, record in self.tail],
        }

        def write(path: Path) -> None:
            path.write_text(json.dumps(content))

        snapshot.files[CHECKPOINT_FILE] = write

    def resend_tail(self, saved: dict[str, Any], resume_step: int) -> None:
        """Send the checkpoint's records that wandb lost with the previous process."""
        tail = saved.get("tail") or []
        evicted = int(saved.get("evicted_through", -1))
        if self.logged_through < evicted:
            log.warning(
                "wandb: the records of steps %d-%d were lost with the killed process; wandb lacks them",
                self.logged_through + 1,
                evicted,
            )
        for step, record in tail:
            if step < resume_step:
                self.send(int(step), record)

    def log_final(self, trainer: Any, cfg: Any, final_dir: Path) -> None:
        """The finished SAE as SAELens logs it: its weights and config, and its sparsity."""
        sparsity = final_dir / "sparsity.safetensors"
        try:
            cfg.logger.log(
                trainer,
                final_dir / "sae_weights.safetensors",
                final_dir / "cfg.json",
                sparsity_path=sparsity if sparsity.exists() else None,
                wandb_aliases=["final_model"],
            )
        except Exception as exc:  # the SAE is saved in final/ whatever wandb does
            log.warning("wandb: the final SAE was not logged as an artifact (%s)", _reason(exc))

    def close(self, exit_code: int = 0) -> None:
        with contextlib.suppress(Exception):
            self.run.finish(exit_code=exit_code)


def _init(wandb: Any, cfg: Any, run_root: Path, run_id: str, mode: str | None) -> Any:
    logger = cfg.logger
    timeout = float(os.environ.get("WANDB_INIT_TIMEOUT", INIT_TIMEOUT_SECONDS))
    return wandb.init(
        project=logger.wandb_project,
        entity=logger.wandb_entity,
        name=logger.run_name,
        config=cfg.to_dict(),
        id=run_id,
        resume="allow",
        dir=str(run_root),
        mode=mode,
        # lenslab's own terminal output and signal handling stay as they are.
        settings=wandb.Settings(console="off", init_timeout=timeout),
    )


def _reason(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__


def _start(wandb: Any, cfg: Any, run_root: Path, run_id: str, mode: str, covered: int) -> tuple[Any, int] | None:
    """The wandb run and the last step wandb has of it; online if it can, else offline."""
    wandb_dir = run_root / "wandb"
    if mode not in ("offline", "dryrun"):
        try:
            run = _init(wandb, cfg, run_root, run_id, None)
        except Exception as exc:  # no service, no API key, a refused id: go on without the service
            log.warning("wandb: cannot start online (%s); logging offline to %s", _reason(exc), wandb_dir)
            # The failed start still holds the run id in wandb's service process; a new one is needed.
            with contextlib.suppress(Exception):
                wandb.teardown()
        else:
            if run.settings.mode not in ("offline", "dryrun"):
                return run, int(run.starting_step) - 1
            # Offline by wandb's own settings; this launch's file has no history yet.
            return run, last_step_in_transaction_logs(wandb_dir, run_id, covered)
    logged_through = last_step_in_transaction_logs(wandb_dir, run_id, covered)
    try:
        return _init(wandb, cfg, run_root, run_id, "offline"), logged_through
    except Exception as exc:
        log.warning("wandb: cannot start offline either (%s); training goes on without wandb", _reason(exc))
        return None


def open_run(cfg: Any, fields: dict[str, Any], run_root: Path, checkpoint: Path | None, step: int) -> WandbLog | None:
    """Start (or continue) the run's wandb run, or return None when wandb logging is off.

    ``checkpoint`` is the one training resumes from (None for a start from scratch), at ``step``.
    """
    mode = os.environ.get("WANDB_MODE", "").lower()
    if not fields.get("log_to_wandb") or mode == "disabled":
        return None
    wandb = import_wandb()
    saved = read_checkpoint_file(checkpoint)
    started = _start(wandb, cfg, run_root, choose_run_id(fields, run_root, saved), mode, step)
    if started is None:
        return None
    logger = WandbLog(wandb, *started, fields)
    logger.resend_tail(saved, step)
    return logger
