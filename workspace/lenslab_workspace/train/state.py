"""Snapshots of the complete training state, and their restoration.

What an exact resume needs, and where it lives in a checkpoint directory:

    sae_weights.safetensors  SAE parameters (SAELens's file name and processing, so
    cfg.json                 ``TrainingSAE.load_from_disk`` opens a checkpoint too)
    trainer_state.pt         optimizer, LR and coefficient schedulers, step and sample
                             counters, feature-sparsity statistics (SAETrainer's own fields)
    lenslab_state.pt         activation scaler, RNG states (python, numpy, torch, CUDA),
                             the data position and the mixing buffer's contents

The ``.pt`` files hold only tensors, numbers, strings and containers (the numpy RNG state is
stored as a tensor), and are read with ``torch.load(weights_only=True)``: a checkpoint from a
mirror or another machine can hold data, never code. A file that needs anything else is
refused (``CheckpointError``) before any of it is used.

A snapshot copies the small state at once and the large tensors (weights, Adam moments) on
the writer thread while the next step's forward and backward run; the optimizer step waits
for that copy. The loop is blocked only for the small copy, and the files are written in the
background while training goes on.
"""

from __future__ import annotations

import copy
import json
import pickle
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lenslab_workspace.train.checkpoint import Snapshot
from lenslab_workspace.train.data import ActivationStream
from lenslab_workspace.train.errors import CheckpointError

SAE_WEIGHTS = "sae_weights.safetensors"
SAE_CFG = "cfg.json"
TRAINER_STATE = "trainer_state.pt"
LENSLAB_STATE = "lenslab_state.pt"


# Tensors at least this large are copied in the background, while the next step's forward and
# backward run; the optimizer step, the only thing that writes them in place, waits for the
# copy (see CheckpointWriter.wait_staged). Smaller ones are copied at once: some SAEs adjust
# small parameters in place outside the optimizer (JumpReLU clamps its threshold in forward).
STAGE_IN_BACKGROUND_NUMEL = 1 << 16


def detached_copy(
    value: Any, deferred: list[tuple[dict[Any, Any] | list[Any], Any, torch.Tensor]] | None = None
) -> Any:
    """Deep copy with tensors cloned to the CPU (optimizer states hold live tensors).

    With ``deferred``, large tensors are not copied yet: their places are recorded as
    ``(container, key, tensor)`` so ``stage`` can fill them in later.
    """
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        result: dict[Any, Any] = {}
        for key, item in value.items():
            if deferred is not None and isinstance(item, torch.Tensor) and item.numel() >= STAGE_IN_BACKGROUND_NUMEL:
                result[key] = None
                deferred.append((result, key, item))
            else:
                result[key] = detached_copy(item, deferred)
        return result
    if isinstance(value, list | tuple):
        return type(value)(detached_copy(v, deferred) for v in value)
    return copy.deepcopy(value)


def stage(deferred: list[tuple[dict[Any, Any] | list[Any], Any, torch.Tensor]]) -> None:
    for container, key, tensor in deferred:
        container[key] = tensor.detach().to("cpu", copy=True)


# SAETrainer's fields an exact resume needs besides the optimizer and schedulers; saved and
# restored by the same list.
TRAINER_FIELDS = (
    "n_training_samples",
    "n_training_steps",
    "act_freq_scores",
    "n_forward_passes_since_fired",
    "n_frac_active_samples",
    "started_fine_tuning",
)


def numpy_rng_state() -> dict[str, Any]:
    """numpy's legacy RNG state as plain values and a tensor, so no numpy type is pickled."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "kind": str(kind),
        "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def set_numpy_rng_state(state: Any) -> None:
    if isinstance(state, dict):
        keys = state["keys"].numpy().astype(np.uint32)
        state = (state["kind"], keys, state["pos"], state["has_gauss"], state["cached_gaussian"])
    np.random.set_state(state)  # a tuple: a checkpoint written before the plain form


def rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": numpy_rng_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    set_numpy_rng_state(states["numpy"])
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


def trainer_state_copy(trainer: Any, deferred: list[tuple[dict[Any, Any] | list[Any], Any, torch.Tensor]]) -> Any:
    """SAETrainer's state (optimizer, schedulers, counters), its large tensors left to ``stage``."""
    return detached_copy(
        {
            "optimizer": trainer.optimizer.state_dict(),
            "lr_scheduler": trainer.lr_scheduler.state_dict(),
            **{name: getattr(trainer, name) for name in TRAINER_FIELDS},
            "coefficient_schedulers": {n: s.state_dict() for n, s in trainer.coefficient_schedulers.items()},
        },
        deferred,
    )


def take_snapshot(trainer: Any, stream: ActivationStream, config_hash: str, versions: dict[str, str]) -> Snapshot:
    """Copy the small state now; leave the large tensors to ``Snapshot.stage`` (background)."""
    sae = trainer.sae
    deferred: list[tuple[dict[Any, Any] | list[Any], Any, torch.Tensor]] = []
    weights = detached_copy(dict(sae.state_dict()), deferred)
    sae_cfg = sae.cfg.to_dict()
    trainer_state = trainer_state_copy(trainer, deferred)
    # The stream's buffers are never written in place (each refill makes new tensors), so
    # holding references is as good as a copy; moving them off a GPU is left to staging.
    stream_state = stream.state_dict()
    lenslab_state = {
        "stream": {k: v for k, v in stream_state.items() if not isinstance(v, torch.Tensor)},
        "rng": rng_states(),
        "scaler": detached_copy(scaler_state(trainer)),
    }
    for key, value in stream_state.items():
        if isinstance(value, torch.Tensor):
            lenslab_state["stream"][key] = None
            deferred.append((lenslab_state["stream"], key, value))

    def stage_and_process() -> None:
        if deferred or not staged:
            stage(deferred)
            deferred.clear()
            sae.process_state_dict_for_saving(weights)
            staged.append(True)

    staged: list[bool] = []

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
        stage=stage_and_process,
    )


# Types that checkpoints written before the RNG state was stored as plain values contain; only
# numpy arrays and dtypes, which reconstruct data and call nothing else.
def _legacy_numpy_globals() -> list[Any]:
    core = getattr(np, "_core", None) or np.core
    allowed: list[Any] = [core.multiarray._reconstruct, np.ndarray, np.dtype]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed.append(dtypes.UInt32DType)
    return allowed


@contextmanager
def _allow_legacy_numpy() -> Iterator[None]:
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    if safe_globals is None:  # torch < 2.5: only the plain form loads
        yield
        return
    with safe_globals(_legacy_numpy_globals()):
        yield


def load_state_file(path: Path) -> dict[str, Any]:
    """Read a checkpoint's ``.pt`` file as data only; anything that would run code is refused."""
    try:
        with _allow_legacy_numpy():
            value = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, TypeError, AttributeError, EOFError) as exc:
        raise CheckpointError(
            f"{path.parent.name}/{path.name} holds something other than tensors and numbers, so it was "
            f"not loaded ({_why_refused(exc)})"
        ) from exc
    if not isinstance(value, dict):
        raise CheckpointError(f"{path.parent.name}/{path.name}: not a lenslab state file")
    return value


def _why_refused(exc: BaseException) -> str:
    """torch's refusal is a page of advice; keep the line that names the offending global."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or "Unsupported" in line]
    return (named or lines or [type(exc).__name__])[0][:200]


def load_states(checkpoint: Path) -> dict[str, dict[str, Any]]:
    """Both ``.pt`` files of a checkpoint, read safely; raises ``CheckpointError`` if refused."""
    states = {name: load_state_file(checkpoint / name) for name in (TRAINER_STATE, LENSLAB_STATE)}
    missing = [k for k in ("optimizer", "lr_scheduler", *TRAINER_FIELDS) if k not in states[TRAINER_STATE]]
    missing += [k for k in ("scaler", "stream", "rng") if k not in states[LENSLAB_STATE]]
    if missing:
        raise CheckpointError(f"{checkpoint.name}: state files lack {', '.join(missing)}")
    return states


def _to_device(value: Any, device: str) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value


def restore(
    trainer: Any, stream: ActivationStream, checkpoint: Path, device: str, states: dict[str, dict[str, Any]]
) -> None:
    """Load a verified checkpoint (its ``.pt`` files already read by ``load_states``) into a
    freshly built trainer and stream."""
    extra = states[LENSLAB_STATE]
    restore_trainer(trainer, checkpoint / SAE_WEIGHTS, states[TRAINER_STATE], extra["scaler"], device)
    stream.load_state_dict(extra["stream"], device=stream_device(stream))
    restore_rng_states(extra["rng"])


def restore_trainer(
    trainer: Any, weights_file: Path, state: dict[str, Any], scaler: dict[str, Any], device: str
) -> None:
    """One SAE's weights, optimizer, schedulers, counters and activation scaler."""
    from sae_lens.training.activation_scaler import ActivationWhitening
    from safetensors.torch import load_file

    weights = load_file(str(weights_file), device=device)
    trainer.sae.process_state_dict_for_loading(weights)
    trainer.sae.load_state_dict(weights)

    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.lr_scheduler.load_state_dict(state["lr_scheduler"])
    for name in TRAINER_FIELDS:
        setattr(trainer, name, _to_device(state[name], device))
    for name, scheduler_state in state["coefficient_schedulers"].items():
        trainer.coefficient_schedulers[name].load_state_dict(scheduler_state)

    trainer.activation_scaler.scaling_factor = scaler["scaling_factor"]
    if scaler["whitening"] is not None:
        whitening = {k: _to_device(v, device) for k, v in scaler["whitening"].items()}
        trainer.activation_scaler.whitening = ActivationWhitening(**whitening)


def stream_device(stream: ActivationStream) -> str:
    return str(stream.model.cfg.device)
