"""The end of a run: the finished SAE in SAELens's inference format under ``final/``."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from lenslab_workspace import __version__
from lenslab_workspace.train.atomic import fsync_dir, fsync_file
from lenslab_workspace.train.rundir import RunDir

FINISHED_MARKER = "lenslab-finished.json"


def versions() -> dict[str, str]:
    """What made a checkpoint or a finished SAE (kept in its manifest and marker)."""
    import sae_lens
    import torch

    return {"lenslab_workspace": __version__, "sae_lens": sae_lens.__version__, "torch": torch.__version__}


def save_final(trainer: Any, cfg: Any, run: RunDir, versions: dict[str, str]) -> None:
    """Fold the scaler into the weights (as SAETrainer.fit does) and save atomically."""
    tmp = run.root / f".final-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    write_final_sae(trainer, cfg, tmp, versions)
    _commit_final(tmp, run)


def save_group_final(trainers: dict[str, Any], cfgs: dict[str, Any], run: RunDir, versions: dict[str, str]) -> None:
    """A group's SAEs, each in ``final/<name>/`` in SAELens's format, committed by one rename."""
    tmp = run.root / f".final-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, trainer in trainers.items():
        write_final_sae(trainer, cfgs[name], tmp / name, versions)
    first = next(iter(trainers.values()))
    marker = {"step": first.n_training_steps, "tokens": first.n_training_samples, "saes": list(trainers), **versions}
    (tmp / FINISHED_MARKER).write_text(json.dumps(marker))
    fsync_file(tmp / FINISHED_MARKER)
    fsync_dir(tmp)
    _commit_final(tmp, run)


def write_final_sae(trainer: Any, cfg: Any, folder: Path, versions: dict[str, str]) -> None:
    """One finished SAE in ``folder``: the scaler folded into its weights, files fsynced."""
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
    trainer.sae.save_inference_model(str(folder))
    save_file({"sparsity": trainer.log_feature_sparsity}, str(folder / "sparsity.safetensors"))
    (folder / "runner_cfg.json").write_text(json.dumps(cfg.to_dict(), default=str))
    (folder / FINISHED_MARKER).write_text(
        json.dumps({"step": trainer.n_training_steps, "tokens": trainer.n_training_samples, **versions})
    )
    for path in folder.iterdir():
        fsync_file(path)
    fsync_dir(folder)


def _commit_final(tmp: Path, run: RunDir) -> None:
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
