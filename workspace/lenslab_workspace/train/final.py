"""The end of a run: the finished SAE in SAELens's inference format under ``final/``."""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

from lenslab_workspace.train.atomic import fsync_dir, fsync_file
from lenslab_workspace.train.rundir import RunDir

FINISHED_MARKER = "lenslab-finished.json"


def save_final(trainer: Any, cfg: Any, run: RunDir, versions: dict[str, str]) -> None:
    """Fold the scaler into the weights (as SAETrainer.fit does) and save atomically."""
    from safetensors.torch import save_file

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
    tmp = run.root / f".final-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.sae.save_inference_model(str(tmp))
    save_file({"sparsity": trainer.log_feature_sparsity}, str(tmp / "sparsity.safetensors"))
    (tmp / "runner_cfg.json").write_text(json.dumps(cfg.to_dict(), default=str))
    (tmp / FINISHED_MARKER).write_text(
        json.dumps({"step": trainer.n_training_steps, "tokens": trainer.n_training_samples, **versions})
    )
    for path in tmp.iterdir():
        fsync_file(path)
    if run.final.exists():
        shutil.rmtree(run.final)
    os.rename(tmp, run.final)
    fsync_dir(run.root)


def set_sae_metadata(sae: Any, cfg: Any) -> None:
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
