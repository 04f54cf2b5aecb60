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
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lenslab.contract import EXIT_FINISHED, EXIT_INTERRUPTED, EXIT_USAGE
from lenslab_workspace.train import checkpoint as ckpt
from lenslab_workspace.train.atomic import fsync_dir, write_json_atomic
from lenslab_workspace.train.config import RunSettings
from lenslab_workspace.train.data import ActivationStream, open_token_rows, sequences_needed
from lenslab_workspace.train.dataset import build_exclude_tokens as build_exclude_tokens  # analysis imports it here
from lenslab_workspace.train.errors import CheckpointError, LenslabTrainError, RunConfigError, UnexpectedError, one_line
from lenslab_workspace.train.final import FINISHED_MARKER, save_final, set_sae_metadata
from lenslab_workspace.train.final import versions as versions  # the benchmarks import it from here
from lenslab_workspace.train.launch import (
    check_config_unchanged,
    check_devices,
    check_hook,
    check_runs_dir,
    staging_dir,
    write_crash_log,
)
from lenslab_workspace.train.loop import Losses, Snapshotter, Stepper, run_steps
from lenslab_workspace.train.mirror import Mirror, MirrorUploader
from lenslab_workspace.train.models import check_pretrained, load_language_model, make_training_sae, seed_everything
from lenslab_workspace.train.resume_point import FoundCheckpoint, ResumePoint
from lenslab_workspace.train.rundir import RunDir
from lenslab_workspace.train.scalers import estimate_if_needed
from lenslab_workspace.train.signals import StopRequest
from lenslab_workspace.train.state import load_states, restore, take_snapshot
from lenslab_workspace.train.status import StatusFile, plain_losses, report
from lenslab_workspace.train.tokenfile import TokenRows
from lenslab_workspace.train.wandb_log import open_run

log = logging.getLogger("lenslab.train")

LOG_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")


@dataclass
class Outcome:
    exit_code: int
    message: str


@dataclass
class Built:
    """What ``_build`` makes: the model's activations, the trainer, where it resumed from."""

    stream: ActivationStream
    trainer: Any
    resumed_from: int | None
    checkpoint: Path | None = None  # the one resumed from


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
        self._check_pretrained()
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

    def _check_pretrained(self) -> None:
        check_pretrained(self.settings)

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
        return ResumePoint(self.run.checkpoints, self.config_hash, self.mirror, self._read_states).find()

    def _model_and_tokens(self) -> tuple[Any, TokenRows, torch.Tensor | None]:
        """What every SAE of the run reads, made once: the model (after seeding, as SAELens
        does), its hooks checked, the token rows and the token ids the streams drop."""
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
        self._check_hooks(model)
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
        return model, tokens, exclude

    def _check_hooks(self, model: Any) -> None:
        check_hook(self.settings, model, self.cfg.sae.d_in)

    def _build(self) -> Built:
        from sae_lens.training.sae_trainer import SAETrainer

        found = self._find_checkpoint()
        cfg, fields = self.cfg, self.settings.runner_fields
        model, tokens, exclude = self._model_and_tokens()
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
        trainer, stream = built.trainer, built.stream
        writer = self._begin(built.resumed_from, [trainer])
        wb = open_run(self.cfg, self.settings.logger_fields, self.run.root, built.checkpoint, trainer.n_training_steps)
        estimate_if_needed(trainer, stream)  # as SAETrainer.fit, before the first step

        def step() -> Any:
            sparsity_log = trainer.maybe_reset_sparsity()
            output = trainer.step(next(stream))
            if wb is not None:
                wb.log_step(trainer, output, sparsity_log)
            trainer.n_training_steps += 1
            return output

        def snapshot() -> ckpt.Snapshot:
            taken = take_snapshot(trainer, stream, self.config_hash, versions())
            if wb is not None:
                wb.add_to(taken)  # the wandb run id and the newest records travel with the checkpoint
            return taken

        def save() -> str:
            stream.finish()  # the prefetch thread stops; the token array is completed
            if wb is not None:
                wb.log_last_window(trainer)
            save_final(trainer, self.cfg, self.run, versions())
            if wb is not None:
                wb.log_final(trainer, self.cfg, self.run.final)
            return f"finished: the SAE is in {self.run.final}"

        try:
            stopped = self._steps(trainer, writer, step, snapshot, lambda output: plain_losses(output.losses))
            return self._conclude(stopped, trainer, writer, snapshot, save)
        except BaseException:
            with contextlib.suppress(BaseException):
                writer.wait()
            raise
        finally:
            if wb is not None:
                wb.close()

    def _begin(self, resumed_from: int | None, trainers: list[Any]) -> ckpt.CheckpointWriter:
        """Training starts: status says so, the mirror's uploader and the checkpoint writer start."""
        res, status, first = self.settings.resilience, self.status, trainers[0]
        assert status is not None
        status.update(state="running", step=first.n_training_steps, tokens_done=first.n_training_samples)
        status.update(resumed_from_step=resumed_from)
        status.write()
        if self.mirror is not None:
            self.uploader = MirrorUploader(self.mirror, res.mirror_max_consecutive_failures, res.mirror_retry_seconds)
        retain = self.uploader.retain(self.run.checkpoints, res.keep_last) if self.uploader is not None else None
        writer = ckpt.CheckpointWriter(self.run.checkpoints, res.keep_last, self._after_commit, retain)
        for trainer in trainers:
            # The optimizer step is the one place the large tensors change; it waits for a
            # snapshot in flight to finish copying them.
            trainer.optimizer.register_step_pre_hook(lambda *_: writer.wait_staged())
        return writer

    def _steps(
        self, trainer: Any, writer: ckpt.CheckpointWriter, step: Stepper, snapshot: Snapshotter, losses: Losses
    ) -> bool:
        """Train to the end (False) or until a signal or the mirror stops it (True)."""
        return run_steps(
            trainer,
            writer,
            self.settings.resilience,
            step,
            snapshot,
            losses,
            stopping=lambda: self.stop.requested or self._mirror_failed(),
            report=lambda rate, latest: self._report(trainer, writer, rate, latest),
        )

    def _conclude(
        self,
        stopped: bool,
        trainer: Any,
        writer: ckpt.CheckpointWriter,
        snapshot: Snapshotter,
        save: Callable[[], str],
    ) -> Outcome:
        """The end of a launch: stopped early, a last checkpoint; else the run is finished by
        ``save`` (final/, wandb's last records; it returns the message)."""
        if stopped:
            writer.submit(snapshot())
            committed = writer.wait()
            saved = f"checkpoint {committed.path.name if committed else '?'} saved"
            if self.uploader is not None and self.uploader.fatal is not None:
                raise CheckpointError(f"{self.uploader.fatal}; {saved}")
            message = f"stopped by {self.stop.signal_name}; {saved}"
            self._close_uploader()
            self._report(trainer, writer, None, {}, state="interrupted", message=message)
            return Outcome(EXIT_INTERRUPTED, message + "; run the same command to continue")
        writer.wait()
        if not self.run.config_file.exists():  # a run too short for a checkpoint: pin it now
            write_json_atomic(self.run.config_file, self.settings.comparable())
        message = save()
        self._close_uploader()
        self._report(trainer, writer, None, {}, state="finished", message=None)
        return Outcome(EXIT_FINISHED, message)

    def _mirror_failed(self) -> bool:
        return self.uploader is not None and self.uploader.fatal is not None

    def _close_uploader(self) -> None:
        """The newest checkpoint gets one last try at the mirror before the launch ends."""
        if self.uploader is not None:
            self.uploader.close()

    def _report(
        self, trainer: Any, writer: ckpt.CheckpointWriter, rate: float | None, losses: dict[str, float], **extra: Any
    ) -> None:
        assert self.status is not None
        mirror = self.uploader.status() if self.uploader is not None else None
        report(self.status, trainer, writer.last_committed, mirror, rate, losses, **extra)


def train(settings: RunSettings, runs_dir: Path, fresh: bool = False) -> Outcome:
    if settings.group:  # several SAEs from one model pass
        from lenslab_workspace.train.group import GroupRun

        return GroupRun(settings, runs_dir, fresh).execute()
    return TrainingRun(settings, runs_dir, fresh).execute()
