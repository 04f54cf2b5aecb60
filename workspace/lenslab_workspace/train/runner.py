"""The training loop: SAELens's SAETrainer does each step; lenslab owns everything around it.

Read top to bottom: check what can be checked without writing anything (launch.py), open
the run directory (a staging one for ``--fresh``), find the newest valid checkpoint, build
the model (and check its hook), data stream and trainer (restoring them from the
checkpoint), then loop: step, maybe snapshot (written in the background, mirrored by
another thread), maybe rewrite status.json, stop cleanly when a signal asks. The end folds
the activation scaler into the weights and saves the SAE in SAELens's inference format
under ``final/``.

A refused launch (exit 2) of a run that did not exist before leaves no run directory. Any
other launch that fails before training leaves ``status.json`` saying ``failed`` (and, for an
unexpected error, a ``crash-*.log``), never a half-made run: ``run-config.json`` is pinned
only when the first checkpoint commits, and ``--fresh`` moves the old run aside only once the
new one is built.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lenslab.contract import EXIT_FINISHED, EXIT_INTERRUPTED, EXIT_USAGE
from lenslab_workspace import __version__
from lenslab_workspace.train import checkpoint as ckpt
from lenslab_workspace.train.atomic import fsync_dir, write_json_atomic
from lenslab_workspace.train.config import RunSettings
from lenslab_workspace.train.data import ActivationStream, open_token_rows, sequences_needed
from lenslab_workspace.train.errors import (
    CheckpointError,
    ConfigChangedError,
    LenslabTrainError,
    RunConfigError,
    UnexpectedError,
)
from lenslab_workspace.train.final import FINISHED_MARKER, save_final, set_sae_metadata
from lenslab_workspace.train.launch import (
    check_config_unchanged,
    check_devices,
    check_hook,
    check_runs_dir,
    staging_dir,
    write_crash_log,
)
from lenslab_workspace.train.mirror import Mirror, MirrorUploader
from lenslab_workspace.train.models import check_pretrained, load_language_model, make_training_sae
from lenslab_workspace.train.progress import Progress, RateWindow
from lenslab_workspace.train.rundir import RunDir
from lenslab_workspace.train.signals import StopRequest
from lenslab_workspace.train.state import load_states, restore, take_snapshot
from lenslab_workspace.train.status import StatusFile
from lenslab_workspace.train.wandb_log import WandbLog, open_run

log = logging.getLogger("lenslab.train")

LOG_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")


@dataclass
class Outcome:
    exit_code: int
    message: str


@dataclass(frozen=True)
class FoundCheckpoint:
    path: Path
    manifest: dict[str, Any]
    states: dict[str, dict[str, Any]]


@dataclass
class Built:
    """What ``_build`` makes: the model's activations, the trainer, where it resumed from."""

    stream: ActivationStream
    trainer: Any
    resumed_from: int | None
    checkpoint: Path | None = None  # the one resumed from


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_exclude_tokens(fields: dict[str, Any], tokenizer: Any) -> torch.Tensor | None:
    setting = fields.get("exclude_special_tokens", False)
    if setting is False:
        return None
    if setting is True:
        if tokenizer is None:
            return None
        from lenslab_workspace.train.data import ByteTokenizer

        if isinstance(tokenizer, ByteTokenizer):
            return torch.tensor([tokenizer.bos_token_id])
        from sae_lens.util import get_special_token_ids

        return torch.tensor(get_special_token_ids(tokenizer))
    return torch.tensor(list(setting))


def versions() -> dict[str, str]:
    import sae_lens

    return {"lenslab_workspace": __version__, "sae_lens": sae_lens.__version__, "torch": torch.__version__}


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:500] or type(exc).__name__


class TrainingRun:
    """One launch of ``lenslab-train``: ``execute()`` checks, builds, then trains."""

    def __init__(self, settings: RunSettings, runs_dir: Path, fresh: bool = False) -> None:
        self.settings = settings
        self.runs_dir = runs_dir
        self.fresh = fresh
        self.target = RunDir.for_run(runs_dir, settings.name)  # where the run lives
        self.run = self.target  # where this launch writes: a staging directory for --fresh
        self.stop = StopRequest()
        self.config_hash = settings.config_hash()
        self.cfg: Any = None  # SAELens's runner config, made once the launch is checked
        self.status: StatusFile | None = None
        self.uploader: MirrorUploader | None = None
        self.mirror: Mirror | None = None
        self._log_handler: logging.Handler | None = None
        self.created = False  # this launch made the run directory (it did not exist before)
        self.made_data = False  # this launch made data/ (a refused launch removes it again)

    def execute(self) -> Outcome:
        check_runs_dir(self.runs_dir, self.target)
        if not self.fresh:
            check_config_unchanged(self.settings, self.target)
            if (self.target.final / FINISHED_MARKER).exists():
                return Outcome(
                    EXIT_FINISHED, f"run '{self.settings.name}' already finished; the SAE is in {self.target.final}"
                )
        check_devices(self.settings)
        check_pretrained(self.settings)
        self.cfg = self.settings.runner_config()
        res = self.settings.resilience
        if res.mirror:
            self.mirror = Mirror(res.mirror, self.settings.name, res.keep_last)
        try:
            self._open()  # only now is anything written
            built = self._build()
            self._commit_launch()
            return self._train(built)
        except BaseException as exc:
            reported = self._fail(exc)
            if reported is exc:
                raise
            raise reported from exc
        finally:
            self._close()

    def _open(self) -> None:
        if self.fresh and not self.target.is_empty():
            self.run = staging_dir(self.target)
        self.created = self.run is self.target and not self.target.root.exists()
        self.made_data = not self.run.data_dir.exists()
        try:
            self.run.create()
        except OSError as exc:
            raise RunConfigError(
                f"--runs-dir {self.runs_dir}: cannot create {self.run.root}: {exc.strerror or exc}"
            ) from exc
        self._log_handler = logging.FileHandler(self.run.log_file)
        self._log_handler.setFormatter(LOG_FORMAT)
        log.addHandler(self._log_handler)
        logging.getLogger("py.warnings").addHandler(self._log_handler)
        self.status = self._new_status()
        self.status.write()  # "starting": the launch has begun
        ckpt.remove_unfinished(self.run.checkpoints)
        self.stop.install()

    def _new_status(self) -> StatusFile:
        total = self.settings.runner_fields.get("training_tokens", 0)
        return StatusFile(self.run.status_file, self.settings.name, total)

    def _read_states(self, checkpoint: Path) -> dict[str, dict[str, Any]]:
        """A checkpoint's state files, read as data only (``CheckpointError`` if refused)."""
        return load_states(checkpoint)

    def _fail(self, exc: BaseException) -> BaseException:
        """Record a failed launch; return the exception the CLI shows (one line)."""
        if self.run is not self.target:  # --fresh: drop the half-built run, keep the old one
            shutil.rmtree(self.run.root, ignore_errors=True)
        refused = isinstance(exc, LenslabTrainError) and exc.exit_code == EXIT_USAGE
        if refused and self.created:
            # A refused launch of a new run leaves nothing behind: the one line says it all.
            shutil.rmtree(self.run.root, ignore_errors=True)
            return exc
        if refused and self.made_data:  # an existing run keeps only its record of the failure
            shutil.rmtree(self.run.data_dir, ignore_errors=True)
        reported = exc
        if not isinstance(exc, LenslabTrainError | KeyboardInterrupt | SystemExit):
            crash = write_crash_log(exc, self.run.root if self.run is self.target else None)
            reported = UnexpectedError(f"unexpected {type(exc).__name__}: {one_line(exc)} (traceback in {crash})")
        if self._log_handler is not None:  # train.log keeps the reason; stderr gets it once, from the CLI
            record = log.makeRecord(
                log.name, logging.ERROR, __file__, 0, "launch failed: %s", (one_line(reported),), None
            )
            self._log_handler.handle(record)
        if self.run is self.target and self.status is not None:
            self.status.update(state="failed", message=one_line(reported))
            if self.uploader is not None:
                self.status.update(mirror=self.uploader.status())
            self.status.write()
            for empty in (self.run.checkpoints, self.run.data_dir):  # made by this launch, still empty
                with contextlib.suppress(OSError):
                    empty.rmdir()
        return reported

    def _close(self) -> None:
        if self.uploader is not None:
            self.uploader.close()
        self.stop.uninstall()
        if self._log_handler is not None:
            log.removeHandler(self._log_handler)
            logging.getLogger("py.warnings").removeHandler(self._log_handler)
            self._log_handler.close()

    def _commit_launch(self) -> None:
        """For --fresh: the new run is built; now set the old one aside and move the new one in."""
        if self.run is self.target:
            return
        if not self.target.is_empty():
            moved = self.target.set_aside()
            log.info("--fresh: the previous run was kept as %s", moved)
        os.rename(self.run.root, self.target.root)
        fsync_dir(self.target.root.parent)
        self.run = self.target
        assert self.status is not None
        self.status.path = self.target.status_file

    def _find_checkpoint(self) -> FoundCheckpoint | None:
        if self.fresh:
            return None
        local: FoundCheckpoint | None = None
        for path, manifest in ckpt.valid_checkpoints(self.run.checkpoints):
            local = self._load(path, manifest)
            if local is not None:
                break
        if self.mirror is not None and self._mirror_is_newer(local):
            restored = self.mirror.restore_latest(self.run.checkpoints, self._accept_from_mirror)
            if restored is not None:
                path, (manifest, states) = restored
                return FoundCheckpoint(path, manifest, states)
        return local

    def _mirror_is_newer(self, local: FoundCheckpoint | None) -> bool:
        """Whether the mirror's newest checkpoint is past the local one. A box that moved to another
        provider and back finds its old volume's checkpoints older than what the other box
        mirrored; resuming from them would redo that work. A local checkpoint needs no mirror:
        an unreachable one then only costs a warning."""
        assert self.mirror is not None
        if local is None:
            return True
        try:
            name = self.mirror.latest_name()
        except CheckpointError as exc:
            log.warning("resuming from the local checkpoint without comparing it to the mirror's: %s", exc)
            return False
        return name is not None and int(name.split("-", 1)[1]) > int(local.manifest["step"])

    def _accept_from_mirror(self, tmp: Path, manifest: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Check a mirror's copy where it was downloaded, before it gets a checkpoint's name:
        nothing unchecked ever looks committed. Raises ``CheckpointError`` to refuse it."""
        if manifest["config_hash"] != self.config_hash:
            raise CheckpointError(
                f"it belongs to another config (hash {manifest['config_hash']}, this run's is {self.config_hash})"
            )
        return manifest, self._read_states(tmp)

    def _load(self, path: Path, manifest: dict[str, Any]) -> FoundCheckpoint | None:
        """Read a checkpoint's state files as data only; a refused one is moved aside."""
        if manifest["config_hash"] != self.config_hash:
            raise ConfigChangedError(
                f"checkpoint {path} belongs to another config (hash {manifest['config_hash']}); "
                "start over with --fresh or use a new run name"
            )
        try:
            return FoundCheckpoint(path, manifest, self._read_states(path))
        except CheckpointError as exc:
            aside = path.with_name(f".refused-{path.name}-{int(time.time())}")
            os.rename(path, aside)
            log.warning("checkpoint refused: %s; moved aside as %s, falling back to an earlier one", exc, aside.name)
            return None

    def _build(self) -> Built:
        from sae_lens.training.sae_trainer import SAETrainer

        found = self._find_checkpoint()
        cfg, fields = self.cfg, self.settings.runner_fields
        for note in self.settings.notes:
            log.info(note)
        if self.settings.resilience.exact:
            # Deterministic kernels on every device (matching_pursuit's backward pass differs
            # between two CPU runs otherwise); cuBLAS also needs the variable, before CUDA starts.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
        seed_everything(cfg.seed)
        model, tokenizer, tokenizer_name = load_language_model(self.settings, str(cfg.llm_device))
        check_hook(self.settings, model, cfg.sae.d_in)
        stream_context = len(range(cfg.context_size)[slice(*cfg.seqpos_slice)])
        exclude = build_exclude_tokens(fields, tokenizer)
        tokens = open_token_rows(  # tokenized in the background: training starts on the first rows
            fields,
            model,
            tokenizer,
            self.run.data_dir,
            tokenizer_name,
            sequences_needed(fields, stream_context),
            reuse_from=(self.target.data_dir,) if self.run is not self.target else (),
            exclude_tokens=exclude,
        )
        stream = ActivationStream(model, tokens, fields, cfg.sae.d_in, exclude)
        sae = make_training_sae(self.settings, cfg)
        set_sae_metadata(sae, cfg)
        sae.to(cfg.device)
        trainer = SAETrainer(cfg=cfg.to_sae_trainer_config(), sae=sae, data_provider=stream)
        if found is None:
            log.info("starting run '%s' from scratch", self.settings.name)
            return Built(stream, trainer, None)
        restore(trainer, stream, found.path, str(cfg.device), found.states)
        step, samples = found.manifest["step"], found.manifest["n_training_samples"]
        log.info("resuming from %s (step %d, %d tokens)", found.path.name, step, samples)
        return Built(stream, trainer, step, found.path)

    def _after_commit(self, committed: ckpt.CommittedCheckpoint) -> None:
        """On the writer thread, once a checkpoint is committed: pin the config, then mirror."""
        if not self.run.config_file.exists():
            write_json_atomic(self.run.config_file, self.settings.comparable())
        if self.uploader is not None:
            self.uploader.submit(committed)

    def _train(self, built: Built) -> Outcome:
        trainer, stream, res = built.trainer, built.stream, self.settings.resilience
        total = trainer.cfg.total_training_samples
        status = self.status
        assert status is not None
        status.update(state="running", step=trainer.n_training_steps, tokens_done=trainer.n_training_samples)
        status.update(resumed_from_step=built.resumed_from)
        status.write()
        wb = open_run(self.cfg, self.settings.logger_fields, self.run.root, built.checkpoint, trainer.n_training_steps)
        if self.mirror is not None:
            self.uploader = MirrorUploader(self.mirror, res.mirror_max_consecutive_failures, res.mirror_retry_seconds)
        retain = self.uploader.retain(self.run.checkpoints, res.keep_last) if self.uploader is not None else None
        writer = ckpt.CheckpointWriter(self.run.checkpoints, res.keep_last, self._after_commit, retain)
        # The optimizer step is the one place the large tensors change; it waits for a
        # snapshot in flight to finish copying them.
        trainer.optimizer.register_step_pre_hook(lambda *_: writer.wait_staged())
        self._estimate_scaler_if_needed(trainer, stream)
        progress = Progress(total, trainer.n_training_samples)
        window = RateWindow(time.monotonic(), trainer.n_training_samples)
        last_checkpoint_time, last_checkpoint_tokens = time.monotonic(), trainer.n_training_samples
        last_status = 0.0
        try:
            while trainer.n_training_samples < total:
                sparsity_log = trainer.maybe_reset_sparsity()
                output = trainer.step(next(stream))
                if wb is not None:
                    wb.log_step(trainer, output, sparsity_log)
                trainer.n_training_steps += 1
                if self.stop.requested or self._mirror_failed():
                    break
                now = time.monotonic()
                tokens_due = res.checkpoint_every_tokens is not None and (
                    trainer.n_training_samples - last_checkpoint_tokens >= res.checkpoint_every_tokens
                )
                if tokens_due or now - last_checkpoint_time >= res.checkpoint_every_seconds:
                    writer.submit(self._snapshot(trainer, stream, wb))
                    last_checkpoint_time, last_checkpoint_tokens = now, trainer.n_training_samples
                if now - last_status >= res.status_every_seconds:
                    last_status = now
                    rate = window.rate(now, trainer.n_training_samples)
                    losses = {k: float(v.item() if hasattr(v, "item") else v) for k, v in output.losses.items()}
                    self._report(trainer, writer, rate, losses)
                    progress.update(trainer.n_training_samples, trainer.n_training_steps, losses, rate)
            if trainer.n_training_samples < total and (self.stop.requested or self._mirror_failed()):
                writer.submit(self._snapshot(trainer, stream, wb))
                committed = writer.wait()
                saved = f"checkpoint {committed.path.name if committed else '?'} saved"
                if self.uploader is not None and self.uploader.fatal is not None:
                    raise CheckpointError(f"{self.uploader.fatal}; {saved}")
                message = f"stopped by {self.stop.signal_name}; {saved}"
                self._close_uploader()
                self._report(trainer, writer, None, {}, state="interrupted", message=message)
                return Outcome(EXIT_INTERRUPTED, message + "; run the same command to continue")
            writer.wait()
            stream.finish()  # the prefetch thread stops; the token array is completed
            if not self.run.config_file.exists():  # a run too short for a checkpoint: pin it now
                write_json_atomic(self.run.config_file, self.settings.comparable())
            if wb is not None:
                wb.log_last_window(trainer)
            save_final(trainer, self.cfg, self.run, versions())
            if wb is not None:
                wb.log_final(trainer, self.cfg, self.run.final)
            self._close_uploader()
            self._report(trainer, writer, None, {}, state="finished", message=None)
            return Outcome(EXIT_FINISHED, f"finished: the SAE is in {self.run.final}")
        except BaseException:
            with contextlib.suppress(BaseException):
                writer.wait()
            raise
        finally:
            progress.close()
            if wb is not None:
                wb.close()

    def _snapshot(self, trainer: Any, stream: ActivationStream, wb: WandbLog | None) -> ckpt.Snapshot:
        snapshot = take_snapshot(trainer, stream, self.config_hash, versions())
        if wb is not None:
            wb.add_to(snapshot)  # the wandb run id and the newest records travel with the checkpoint
        return snapshot

    def _mirror_failed(self) -> bool:
        return self.uploader is not None and self.uploader.fatal is not None

    def _close_uploader(self) -> None:
        """The newest checkpoint gets one last try at the mirror before the launch ends."""
        if self.uploader is not None:
            self.uploader.close()

    def _estimate_scaler_if_needed(self, trainer: Any, stream: ActivationStream) -> None:
        # Same rule as SAETrainer.fit: statistics restored from a checkpoint are kept.
        mode = trainer.sae.cfg.normalize_activations
        if mode == "expected_average_only_in" and trainer.activation_scaler.scaling_factor is None:
            trainer.activation_scaler.estimate_scaling_factor(
                d_in=trainer.sae.cfg.d_in,
                data_provider=stream,
                n_batches_for_norm_estimate=trainer.cfg.n_batches_for_norm_estimate,
            )
        elif mode == "covariance_whitening" and trainer.activation_scaler.whitening is None:
            trainer.activation_scaler.estimate_whitening(
                d_in=trainer.sae.cfg.d_in,
                data_provider=stream,
                n_batches_for_norm_estimate=trainer.cfg.n_batches_for_norm_estimate,
            )

    def _report(
        self,
        trainer: Any,
        writer: ckpt.CheckpointWriter,
        rate: float | None,
        losses: dict[str, float],
        **extra: Any,
    ) -> None:
        status = self.status
        assert status is not None
        total = trainer.cfg.total_training_samples
        last = writer.last_committed
        fields: dict[str, Any] = {
            "step": trainer.n_training_steps,
            "tokens_done": trainer.n_training_samples,
            "tokens_per_second": rate,
            "eta_seconds": (total - trainer.n_training_samples) / rate if rate else None,
            **extra,
        }
        if losses:
            fields["losses"] = losses
        if self.uploader is not None:
            fields["mirror"] = self.uploader.status()
        if last is not None:
            fields["last_checkpoint"] = {
                "step": last.step,
                "tokens": last.n_training_samples,
                "path": str(last.path),
                "time": last.created_at,
            }
        status.update(**fields)
        status.write()


def train(settings: RunSettings, runs_dir: Path, fresh: bool = False) -> Outcome:
    if settings.group:  # several SAEs from one model pass
        from lenslab_workspace.train.group import GroupRun

        return GroupRun(settings, runs_dir, fresh).execute()
    return TrainingRun(settings, runs_dir, fresh).execute()
