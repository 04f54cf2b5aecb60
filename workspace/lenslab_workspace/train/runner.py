"""The training loop: SAELens's SAETrainer does each step; lenslab owns everything around it.

Read top to bottom: prepare the run directory, decide fresh start or resume, build the model,
data stream and trainer (resuming restores them from the newest valid checkpoint), then loop:
step, maybe snapshot (written in the background), maybe rewrite status.json, stop cleanly
when a signal asks. The end folds the activation scaler into the weights and saves the SAE in
SAELens's inference format under ``final/``.
"""

from __future__ import annotations

import contextlib
import json
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

from lenslab_workspace import __version__
from lenslab_workspace.train import checkpoint as ckpt
from lenslab_workspace.train.atomic import fsync_dir, fsync_file, write_json_atomic
from lenslab_workspace.train.config import RunSettings, changed_fields
from lenslab_workspace.train.data import ActivationStream, materialize_tokens, sequences_needed
from lenslab_workspace.train.errors import ConfigChangedError, RunConfigError
from lenslab_workspace.train.mirror import Mirror
from lenslab_workspace.train.models import load_language_model
from lenslab_workspace.train.progress import Progress
from lenslab_workspace.train.rundir import RunDir
from lenslab_workspace.train.signals import StopRequest
from lenslab_workspace.train.state import restore, take_snapshot
from lenslab_workspace.train.status import StatusFile

log = logging.getLogger("lenslab.train")

EXIT_FINISHED = 0
EXIT_FAILED = 1
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: stopped on request with a checkpoint; run again to continue
FINISHED_MARKER = "lenslab-finished.json"


@dataclass
class Outcome:
    exit_code: int
    message: str


def prepare_run_dir(settings: RunSettings, runs_dir: Path, fresh: bool) -> RunDir:
    run = RunDir.for_run(runs_dir, settings.name)
    if fresh and not run.is_empty():
        moved = run.set_aside()
        log.info("--fresh: the previous run was kept as %s", moved)
    run.create()
    return run


def check_config_unchanged(settings: RunSettings, run: RunDir) -> None:
    if not run.config_file.exists():
        return
    saved = json.loads(run.config_file.read_text())
    before, now = saved.get("runner", {}).get("device", "cpu"), settings.runner_fields.get("device", "cpu")
    if before != now:
        log.warning(
            "run '%s' started on %s and resumes on %s: it continues correctly, but the result will "
            "not be bit-identical to an uninterrupted run on one device",
            settings.name,
            before,
            now,
        )
    differing = changed_fields(saved, settings.comparable())
    if differing:
        raise ConfigChangedError(
            f"run '{settings.name}' was started with another config; these fields differ: {', '.join(differing)}. "
            f"Restore them, or start over with --fresh (the old run is kept), or use a new name"
        )


def attach_log_file(path: Path) -> None:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    log.addHandler(handler)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_exclude_tokens(runner: dict[str, Any], tokenizer: Any) -> torch.Tensor | None:
    setting = runner.get("exclude_special_tokens", False)
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


class TrainingRun:
    """One launch of ``lenslab-train``: builds everything, then ``run()`` trains."""

    def __init__(self, settings: RunSettings, runs_dir: Path, fresh: bool = False) -> None:
        self.settings = settings
        self.run = prepare_run_dir(settings, runs_dir, fresh)
        attach_log_file(self.run.log_file)
        self.stop = StopRequest()
        self.config_hash = settings.config_hash()
        self.mirror = (
            Mirror(settings.resilience.mirror, settings.name, settings.resilience.keep_last)
            if settings.resilience.mirror
            else None
        )

    def execute(self) -> Outcome:
        if (self.run.final / FINISHED_MARKER).exists():
            return Outcome(
                EXIT_FINISHED, f"run '{self.settings.name}' already finished; the SAE is in {self.run.final}"
            )
        check_config_unchanged(self.settings, self.run)
        # Only now: a refused launch leaves the run directory exactly as it found it.
        ckpt.remove_unfinished(self.run.checkpoints)
        self.stop.install()
        found = self._find_checkpoint()
        self.cfg = self.settings.runner_config()
        self._build(found)
        if not self.run.config_file.exists():
            write_json_atomic(self.run.config_file, self.settings.comparable())
        return self._train()

    def _find_checkpoint(self) -> tuple[Path, dict[str, Any]] | None:
        found = ckpt.latest_valid(self.run.checkpoints)
        if found is None and self.mirror is not None and self.mirror.restore_latest(self.run.checkpoints):
            found = ckpt.latest_valid(self.run.checkpoints)
        return found

    def _build(self, found: tuple[Path, dict[str, Any]] | None) -> None:
        from sae_lens.saes.sae import TrainingSAE, TrainingSAEConfig
        from sae_lens.training.sae_trainer import SAETrainer

        cfg = self.cfg
        if self.settings.resilience.exact and str(cfg.device).startswith("cuda"):
            # cuBLAS needs this for deterministic matmuls; it must be set before CUDA starts.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
        seed_everything(cfg.seed)
        runner = self.settings.runner_fields
        self.model, tokenizer, tokenizer_name = load_language_model(self.settings, str(cfg.llm_device))
        stream_context = len(range(cfg.context_size)[slice(*cfg.seqpos_slice)])
        tokens = materialize_tokens(
            runner, self.model, tokenizer, self.run.data_dir, tokenizer_name, sequences_needed(runner, stream_context)
        )
        self.stream = ActivationStream(
            self.model, tokens, runner, cfg.sae.d_in, build_exclude_tokens(runner, tokenizer)
        )
        sae = TrainingSAE.from_dict(TrainingSAEConfig.from_dict(cfg.get_training_sae_cfg_dict()).to_dict())
        _set_sae_metadata(sae, cfg)
        sae.to(cfg.device)
        self.trainer = SAETrainer(cfg=cfg.to_sae_trainer_config(), sae=sae, data_provider=self.stream)
        self.resumed_from: int | None = None
        if found is not None:
            path, manifest = found
            if manifest["config_hash"] != self.config_hash:
                raise ConfigChangedError(
                    f"checkpoint {path} belongs to another config (hash {manifest['config_hash']}); "
                    "start over with --fresh or use a new run name"
                )
            restore(self.trainer, self.stream, path, str(cfg.device))
            self.resumed_from = manifest["step"]
            log.info(
                "resuming from %s (step %d, %d tokens)", path.name, manifest["step"], manifest["n_training_samples"]
            )
        else:
            log.info("starting run '%s' from scratch", self.settings.name)

    def _train(self) -> Outcome:
        trainer, res = self.trainer, self.settings.resilience
        total = trainer.cfg.total_training_samples
        status = StatusFile(self.run.status_file, self.settings.name, total)
        status.update(
            state="running",
            step=trainer.n_training_steps,
            tokens_done=trainer.n_training_samples,
            resumed_from_step=self.resumed_from,
        )
        status.write()
        writer = ckpt.CheckpointWriter(
            self.run.checkpoints, res.keep_last, self.mirror.upload if self.mirror is not None else None
        )
        # The optimizer step is the one place the large tensors change; it waits for a
        # snapshot in flight to finish copying them.
        trainer.optimizer.register_step_pre_hook(lambda *_: writer.wait_staged())
        self._estimate_scaler_if_needed()
        progress = Progress(total, trainer.n_training_samples)
        start_time, start_tokens = time.monotonic(), trainer.n_training_samples
        last_checkpoint_time, last_checkpoint_tokens = time.monotonic(), trainer.n_training_samples
        last_status = 0.0
        try:
            while trainer.n_training_samples < total:
                trainer.maybe_reset_sparsity()
                output = trainer.step(next(self.stream))
                trainer.n_training_steps += 1
                if self.stop.requested:
                    break
                now = time.monotonic()
                tokens_due = res.checkpoint_every_tokens is not None and (
                    trainer.n_training_samples - last_checkpoint_tokens >= res.checkpoint_every_tokens
                )
                if tokens_due or now - last_checkpoint_time >= res.checkpoint_every_seconds:
                    writer.submit(take_snapshot(trainer, self.stream, self.config_hash, versions()))
                    last_checkpoint_time, last_checkpoint_tokens = now, trainer.n_training_samples
                if now - last_status >= res.status_every_seconds:
                    last_status = now
                    rate = (trainer.n_training_samples - start_tokens) / max(now - start_time, 1e-9)
                    losses = {k: float(v.item() if hasattr(v, "item") else v) for k, v in output.losses.items()}
                    self._report(status, writer, rate, losses)
                    progress.update(trainer.n_training_samples, trainer.n_training_steps, losses, rate)
            if self.stop.requested and trainer.n_training_samples < total:
                writer.submit(take_snapshot(trainer, self.stream, self.config_hash, versions()))
                committed = writer.wait()
                message = (
                    f"stopped by {self.stop.signal_name}; checkpoint {committed.path.name if committed else '?'} saved"
                )
                self._report(status, writer, None, {}, state="interrupted", message=message)
                return Outcome(EXIT_INTERRUPTED, message + "; run the same command to continue")
            writer.wait()
            self._save_final()
            self._report(status, writer, None, {}, state="finished", message=None)
            return Outcome(EXIT_FINISHED, f"finished: the SAE is in {self.run.final}")
        except BaseException as exc:
            with contextlib.suppress(BaseException):
                writer.wait()
            status.update(state="failed", message=" ".join(str(exc).split())[:500] or type(exc).__name__)
            with contextlib.suppress(OSError):
                status.write()
            raise
        finally:
            progress.close()

    def _estimate_scaler_if_needed(self) -> None:
        # Same rule as SAETrainer.fit: statistics restored from a checkpoint are kept.
        trainer = self.trainer
        mode = trainer.sae.cfg.normalize_activations
        if mode == "expected_average_only_in" and trainer.activation_scaler.scaling_factor is None:
            trainer.activation_scaler.estimate_scaling_factor(
                d_in=trainer.sae.cfg.d_in,
                data_provider=self.stream,
                n_batches_for_norm_estimate=trainer.cfg.n_batches_for_norm_estimate,
            )
        elif mode == "covariance_whitening" and trainer.activation_scaler.whitening is None:
            trainer.activation_scaler.estimate_whitening(
                d_in=trainer.sae.cfg.d_in,
                data_provider=self.stream,
                n_batches_for_norm_estimate=trainer.cfg.n_batches_for_norm_estimate,
            )

    def _report(
        self,
        status: StatusFile,
        writer: ckpt.CheckpointWriter,
        rate: float | None,
        losses: dict[str, float],
        **extra: Any,
    ) -> None:
        trainer = self.trainer
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
        if last is not None:
            fields["last_checkpoint"] = {
                "step": last.step,
                "tokens": last.n_training_samples,
                "path": str(last.path),
                "time": last.created_at,
            }
        status.update(**fields)
        status.write()

    def _save_final(self) -> None:
        """Fold the scaler into the weights (as SAETrainer.fit does) and save atomically."""
        from safetensors.torch import save_file

        trainer = self.trainer
        scaler = trainer.activation_scaler
        if scaler.scaling_factor is not None:
            trainer.sae.fold_activation_norm_scaling_factor(scaler.scaling_factor)
            scaler.scaling_factor = None
        if scaler.whitening is not None:
            w = scaler.whitening
            trainer.sae.fold_activation_whitening(
                mean=w.mean, whitening_matrix=w.matrix, unwhitening_matrix=w.inverse_matrix
            )
            scaler.whitening = None
        trainer.set_final_sae_metadata()
        tmp = self.run.root / f".final-tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        trainer.sae.save_inference_model(str(tmp))
        save_file({"sparsity": trainer.log_feature_sparsity}, str(tmp / "sparsity.safetensors"))
        (tmp / "runner_cfg.json").write_text(json.dumps(self.cfg.to_dict(), default=str))
        (tmp / FINISHED_MARKER).write_text(
            json.dumps({"step": trainer.n_training_steps, "tokens": trainer.n_training_samples, **versions()})
        )
        for path in tmp.iterdir():
            fsync_file(path)
        if self.run.final.exists():
            shutil.rmtree(self.run.final)
        os.rename(tmp, self.run.final)
        fsync_dir(self.run.root)


def _set_sae_metadata(sae: Any, cfg: Any) -> None:
    """What LanguageModelSAETrainingRunner records, so tools built on SAELens find it."""
    meta = sae.cfg.metadata
    for field in (
        "dataset_path",
        "hook_name",
        "model_name",
        "model_class_name",
        "hook_head_index",
        "context_size",
        "seqpos_slice",
        "model_from_pretrained_kwargs",
        "prepend_bos",
        "exclude_special_tokens",
        "sequence_separator_token",
        "disable_concat_sequences",
    ):
        setattr(meta, field, getattr(cfg, field))


def train(settings: RunSettings, runs_dir: Path, fresh: bool = False) -> Outcome:
    if settings.runner_fields.get("training_tokens", 1) <= 0:
        raise RunConfigError(f"{settings.source}: field 'training_tokens' must be positive")
    return TrainingRun(settings, runs_dir, fresh).execute()
