"""wandb for a group: one wandb run, each SAE's records under its name, as SAELens's multi-SAE runner logs.

SAELens's ``MultiSAETrainingRunner`` starts one wandb run for all its SAEs and prefixes each
SAE's records with ``<sae name>/`` (``k8/losses/mse_loss``), adding one unprefixed
``details/n_training_samples`` to the train-step records; its config is the shared run's with a
``saes`` table of each SAE's, and its default name is ``multi-<architectures>-N<count>-LR-...``.
A group does the same, at the steps ``SAETrainer.fit`` logs them (wandb_log.py), so a sweep's
curves sit side by side in one wandb workspace. The resume rules (one run id kept across
launches, each step once) are wandb_log.py's: only the records differ.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from lenslab_workspace.train.group_config import PER_SAE_FIELDS
from lenslab_workspace.train.wandb_log import WandbLog


@dataclasses.dataclass(frozen=True)
class GroupWandbConfig:
    """What ``wandb_log.open_run`` reads of a runner config (``logger``, ``to_dict``), for a group."""

    logger: Any
    config: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return self.config


def group_wandb_config(cfgs: dict[str, Any], logger_fields: dict[str, Any]) -> GroupWandbConfig:
    first = next(iter(cfgs.values()))
    shared = {k: v for k, v in first.to_dict().items() if k != "sae" and k not in PER_SAE_FIELDS}
    logger = first.logger
    if logger_fields.get("run_name") is None:  # SAELens's default for a group, not the first SAE's
        archs = "+".join(sorted({cfg.sae.architecture() for cfg in cfgs.values()}))
        name = f"multi-{archs}-N{len(cfgs)}-LR-{first.lr}-Tokens-{first.training_tokens:.3e}"
        logger = dataclasses.replace(logger, run_name=name)
    return GroupWandbConfig(logger, {**shared, "saes": {name: cfg.to_dict() for name, cfg in cfgs.items()}})


def prefixed(name: str, record: dict[str, Any]) -> dict[str, Any]:
    return {f"{name}/{key}": value for key, value in record.items()}


def log_group_step(wb: WandbLog, trainers: dict[str, Any], outputs: dict[str, Any], sparsity: dict[str, Any]) -> None:
    """After the SAEs' step, before their step counters advance (as ``WandbLog.log_step``)."""
    first = next(iter(trainers.values()))
    step, samples = first.n_training_steps, first.n_training_samples
    record: dict[str, Any] = {}
    for name, window in sparsity.items():
        record.update(prefixed(name, window))
    if (step + 1) % wb.frequency == 0:
        record["details/n_training_samples"] = samples
        for name, trainer in trainers.items():
            logged = trainer.build_train_step_log_dict(output=outputs[name], n_training_samples=samples)
            record.update(prefixed(name, logged))
    if (step + 1) % wb.eval_every == 0:
        for name, trainer in trainers.items():
            histograms = {key: wb.wandb.Histogram(value) for key, value in trainer.sae.log_histograms().items()}
            record.update(prefixed(name, histograms))
    wb.send(step, record)


def log_group_end(wb: WandbLog, trainers: dict[str, Any]) -> None:
    """Each SAE's sparsity window open at the end, before its scaler is folded."""
    record: dict[str, Any] = {}
    for name, trainer in trainers.items():
        record.update(prefixed(name, trainer.full_sparsity_window_log()))
    wb.send(next(iter(trainers.values())).n_training_steps, record)


def log_group_final(wb: WandbLog, trainers: dict[str, Any], cfgs: dict[str, Any], final_dir: Path) -> None:
    """Each finished SAE as its own artifacts, as SAELens's multi-SAE runner logs them."""
    for name, trainer in trainers.items():
        wb.log_final(trainer, cfgs[name], final_dir / name)
