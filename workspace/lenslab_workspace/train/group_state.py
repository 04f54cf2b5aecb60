"""A group's checkpoint: every SAE's state and the shared streams, in one atomic checkpoint.

    <sae>.sae_weights.safetensors  each SAE's parameters (SAELens's processing, as alone)
    <sae>.cfg.json                 each SAE's SAELens config
    <sae>.trainer_state.pt         its optimizer, schedulers, counters, sparsity statistics
                                   and activation scaler
    group_state.pt                 the streams (data position, mixing buffer, shuffle RNG
                                   state each), the global RNG states and the SAEs' names

One manifest lists them all and one rename commits them (checkpoint.py), so the SAEs of a
group can never be restored from different steps. Files are read as data only, as in
state.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lenslab_workspace.train.checkpoint import Snapshot
from lenslab_workspace.train.errors import CheckpointError
from lenslab_workspace.train.group_data import GroupStream
from lenslab_workspace.train.state import (
    SAE_CFG,
    SAE_WEIGHTS,
    TRAINER_FIELDS,
    TRAINER_STATE,
    detached_copy,
    load_state_file,
    restore_rng_states,
    restore_trainer,
    rng_states,
    scaler_state,
    stage,
    trainer_state_copy,
)

GROUP_STATE = "group_state.pt"
Deferred = list[tuple[dict[Any, Any] | list[Any], Any, torch.Tensor]]


def member_file(member: str, name: str) -> str:
    return f"{member}.{name}"


def take_group_snapshot(
    trainers: dict[str, Any], streams: list[GroupStream], config_hash: str, versions: dict[str, str]
) -> Snapshot:
    """Copy the small state now; the large tensors are copied by ``stage`` (writer thread)."""
    deferred: Deferred = []
    files: dict[str, Callable[[Path], None]] = {}
    weights: dict[str, dict[str, Any]] = {}
    for name, trainer in trainers.items():
        weights[name] = detached_copy(dict(trainer.sae.state_dict()), deferred)
        state = {**trainer_state_copy(trainer, deferred), "scaler": detached_copy(scaler_state(trainer))}
        files.update(_member_files(name, weights[name], trainer.sae.cfg.to_dict(), state))
    group = {"streams": [s.state_dict() for s in streams], "rng": rng_states(), "members": list(trainers)}
    files[GROUP_STATE] = lambda path: torch.save(group, path)
    staged: list[bool] = []

    def stage_and_process() -> None:
        if not staged:
            stage(deferred)
            deferred.clear()
            for name, trainer in trainers.items():
                trainer.sae.process_state_dict_for_saving(weights[name])
            staged.append(True)

    first = next(iter(trainers.values()))
    return Snapshot(
        step=first.n_training_steps,
        n_training_samples=first.n_training_samples,
        config_hash=config_hash,
        versions=versions,
        files=files,
        stage=stage_and_process,
    )


def _member_files(
    name: str, weights: dict[str, Any], sae_cfg: dict[str, Any], state: dict[str, Any]
) -> dict[str, Callable[[Path], None]]:
    def write_weights(path: Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in weights.items()}, str(path))

    return {
        member_file(name, SAE_WEIGHTS): write_weights,
        member_file(name, SAE_CFG): lambda path: path.write_text(json.dumps(sae_cfg)),
        member_file(name, TRAINER_STATE): lambda path: torch.save(state, path),
    }


def load_group_states(checkpoint: Path, members: list[str]) -> dict[str, dict[str, Any]]:
    """Every SAE's trainer state and the group state, read safely; ``CheckpointError`` if refused."""
    group = load_state_file(checkpoint / GROUP_STATE)
    if group.get("members") != members or not isinstance(group.get("streams"), list) or "rng" not in group:
        raise CheckpointError(f"{checkpoint.name}: {GROUP_STATE} does not hold this group's SAEs and streams")
    states: dict[str, dict[str, Any]] = {GROUP_STATE: group}
    for name in members:
        state = load_state_file(checkpoint / member_file(name, TRAINER_STATE))
        missing = [k for k in ("optimizer", "lr_scheduler", "scaler", *TRAINER_FIELDS) if k not in state]
        if missing:
            raise CheckpointError(f"{checkpoint.name}: the state of SAE '{name}' lacks {', '.join(missing)}")
        states[name] = state
    return states


def restore_group(
    trainers: dict[str, Any],
    streams: list[GroupStream],
    checkpoint: Path,
    device: str,
    states: dict[str, dict[str, Any]],
) -> None:
    """Load a verified group checkpoint into freshly built trainers and streams."""
    group = states[GROUP_STATE]
    if len(group["streams"]) != len(streams):
        raise CheckpointError(
            f"{checkpoint.name}: holds {len(group['streams'])} streams, this group has {len(streams)}"
        )
    for name, trainer in trainers.items():
        state = states[name]
        restore_trainer(trainer, checkpoint / member_file(name, SAE_WEIGHTS), state, state["scaler"], device)
    for stream, stream_state in zip(streams, group["streams"], strict=True):
        stream.load_state_dict(stream_state, device=str(stream.model.cfg.device))
    restore_rng_states(group["rng"])
