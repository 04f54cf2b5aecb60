"""The activation scaler's estimate before training, as ``SAETrainer.fit`` makes it: alone or in a group.

SAELens estimates the normalisation (``expected_average_only_in``: a scaling factor;
``covariance_whitening``: a whitening transform) from the stream's first
``n_batches_for_norm_estimate`` batches, which training then does not see again. Statistics
restored from a checkpoint are kept, as ``fit`` keeps them.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import torch

NORM_MODES = ("expected_average_only_in", "covariance_whitening")  # they read batches first


def needs_estimate(trainer: Any) -> bool:
    mode = trainer.sae.cfg.normalize_activations
    scaler = trainer.activation_scaler
    return (mode == "expected_average_only_in" and scaler.scaling_factor is None) or (
        mode == "covariance_whitening" and scaler.whitening is None
    )


def estimate(trainer: Any, batches: Iterator[torch.Tensor]) -> None:
    """SAETrainer's estimate for ``trainer``'s normalisation, from ``batches``."""
    scaler, d_in, n_batches = trainer.activation_scaler, trainer.sae.cfg.d_in, trainer.cfg.n_batches_for_norm_estimate
    if trainer.sae.cfg.normalize_activations == "expected_average_only_in":
        scaler.estimate_scaling_factor(d_in=d_in, data_provider=batches, n_batches_for_norm_estimate=n_batches)
    else:
        scaler.estimate_whitening(d_in=d_in, data_provider=batches, n_batches_for_norm_estimate=n_batches)


def estimate_if_needed(trainer: Any, stream: Iterator[torch.Tensor]) -> None:
    """One SAE alone: its estimate reads the stream's next batches."""
    if needs_estimate(trainer):
        estimate(trainer, stream)


def estimate_group(trainers: dict[str, Any], streams: list[Any], stream_of: dict[str, int]) -> None:
    """A group: each stream's first batches once, for every SAE it serves that needs them (the
    SAEs of a stream share ``n_batches_for_norm_estimate``, a field of the whole group).

    An estimate is a function of those batches alone, so it is made once per normalisation mode
    and copied to the stream's other SAEs of that mode. One mode reads the stream as it goes,
    as a single run does (SAELens's default of 1000 batches of 4096 x 768 floats would be
    12 GB if kept); only a stream serving both modes keeps its batches, to read them twice."""
    for index, stream in enumerate(streams):
        needs = [name for name, i in stream_of.items() if i == index and needs_estimate(trainers[name])]
        if not needs:
            continue
        modes = {trainers[name].sae.cfg.normalize_activations for name in needs}
        n_batches = trainers[needs[0]].cfg.n_batches_for_norm_estimate
        kept = [next(stream) for _ in range(n_batches)] if len(modes) > 1 else None
        made: dict[str, Any] = {}
        for name in needs:
            trainer = trainers[name]
            mode = trainer.sae.cfg.normalize_activations
            if mode in made:
                _copy_estimate(made[mode].activation_scaler, trainer.activation_scaler)
                continue
            estimate(trainer, iter(kept) if kept is not None else stream)
            made[mode] = trainer


def _copy_estimate(source: Any, target: Any) -> None:
    target.scaling_factor = source.scaling_factor
    target.whitening = copy.deepcopy(source.whitening)
