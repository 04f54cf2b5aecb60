"""Snapshots of the complete training state, and their restoration.

What an exact resume needs, and where it lives in a checkpoint directory:

    sae_weights.safetensors  SAE parameters (SAELens's file name and processing, so
    cfg.json                 ``TrainingSAE.load_from_disk`` opens a checkpoint too)
    trainer_state.pt         optimizer, LR and coefficient schedulers, step and sample
                             counters, feature-sparsity statistics (SAETrainer's own fields)
    lenslab_state.pt         activation scaler, RNG states (python, numpy, torch, CUDA),
                             the data position and the mixing buffer's contents

Every tensor is copied off the live state when the snapshot is taken, so the files can be
written in the background while training goes on.
"""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lenslab_workspace.train.checkpoint import Snapshot
from lenslab_workspace.train.data import ActivationStream

SAE_WEIGHTS = "sae_weights.safetensors"
SAE_CFG = "cfg.json"
TRAINER_STATE = "trainer_state.pt"
LENSLAB_STATE = "lenslab_state.pt"


def detached_copy(value: Any) -> Any:
    """Deep copy with every tensor cloned to the CPU (optimizer states hold live tensors)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: detached_copy(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(detached_copy(v) for v in value)
    return copy.deepcopy(value)


def rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def scaler_state(trainer: Any) -> dict[str, Any]:
    whitening = trainer.activation_scaler.whitening
    return {
        "scaling_factor": trainer.activation_scaler.scaling_factor,
        "whitening": None
        if whitening is None
        else {"mean": whitening.mean, "matrix": whitening.matrix, "inverse_matrix": whitening.inverse_matrix},
    }


def take_snapshot(trainer: Any, stream: ActivationStream, config_hash: str, versions: dict[str, str]) -> Snapshot:
    sae = trainer.sae
    weights = detached_copy(dict(sae.state_dict()))
    sae.process_state_dict_for_saving(weights)
    sae_cfg = sae.cfg.to_dict()
    trainer_state = detached_copy(
        {
            "optimizer": trainer.optimizer.state_dict(),
            "lr_scheduler": trainer.lr_scheduler.state_dict(),
            "n_training_samples": trainer.n_training_samples,
            "n_training_steps": trainer.n_training_steps,
            "act_freq_scores": trainer.act_freq_scores,
            "n_forward_passes_since_fired": trainer.n_forward_passes_since_fired,
            "n_frac_active_samples": trainer.n_frac_active_samples,
            "started_fine_tuning": trainer.started_fine_tuning,
            "coefficient_schedulers": {n: s.state_dict() for n, s in trainer.coefficient_schedulers.items()},
        }
    )
    lenslab_state = detached_copy({"stream": stream.state_dict(), "rng": rng_states(), "scaler": scaler_state(trainer)})

    def write_weights(path: Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in weights.items()}, str(path))

    def write_cfg(path: Path) -> None:
        path.write_text(json.dumps(sae_cfg))

    files: dict[str, Callable[[Path], None]] = {
        SAE_WEIGHTS: write_weights,
        SAE_CFG: write_cfg,
        TRAINER_STATE: lambda path: torch.save(trainer_state, path),
        LENSLAB_STATE: lambda path: torch.save(lenslab_state, path),
    }
    return Snapshot(
        step=trainer.n_training_steps,
        n_training_samples=trainer.n_training_samples,
        config_hash=config_hash,
        versions=versions,
        files=files,
    )


def restore(trainer: Any, stream: ActivationStream, checkpoint: Path, device: str) -> None:
    """Load a verified checkpoint into a freshly built trainer and stream."""
    from sae_lens.training.activation_scaler import ActivationWhitening
    from safetensors.torch import load_file

    weights = load_file(str(checkpoint / SAE_WEIGHTS), device=device)
    trainer.sae.process_state_dict_for_loading(weights)
    trainer.sae.load_state_dict(weights)

    state = torch.load(checkpoint / TRAINER_STATE, map_location=device, weights_only=False)
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.lr_scheduler.load_state_dict(state["lr_scheduler"])
    trainer.n_training_samples = state["n_training_samples"]
    trainer.n_training_steps = state["n_training_steps"]
    trainer.act_freq_scores = state["act_freq_scores"]
    trainer.n_forward_passes_since_fired = state["n_forward_passes_since_fired"]
    trainer.n_frac_active_samples = state["n_frac_active_samples"]
    trainer.started_fine_tuning = state["started_fine_tuning"]
    for name, scheduler_state in state["coefficient_schedulers"].items():
        trainer.coefficient_schedulers[name].load_state_dict(scheduler_state)

    extra = torch.load(checkpoint / LENSLAB_STATE, map_location="cpu", weights_only=False)
    scaler = extra["scaler"]
    trainer.activation_scaler.scaling_factor = scaler["scaling_factor"]
    if scaler["whitening"] is not None:
        trainer.activation_scaler.whitening = ActivationWhitening(**scaler["whitening"])
    stream.load_state_dict(extra["stream"], device=stream_device(stream))
    restore_rng_states(extra["rng"])


def stream_device(stream: ActivationStream) -> str:
    return str(stream.model.cfg.device)
