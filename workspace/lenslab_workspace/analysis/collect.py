"""A reduce-style way to get data out of TransformerLens hooks.

``collect(model, tokens, {hook_name: reducer}, batch_size=...)`` runs the model once per batch
for all hooks and folds every hook's activations into its reducer's state. A reducer is an
``init`` (the empty state), a pure ``step(state, activations, batch) -> state`` and a
``finish(state) -> result``: no global variables, no partial functions, and memory that depends
on the reducers' states, never on the number of tokens.

    from lenslab_workspace.analysis import collect, MeanVar
    stats = collect(model, tokens, {"blocks.0.hook_resid_post": MeanVar()}, batch_size=16)
    mean, var = stats["blocks.0.hook_resid_post"]
"""

from __future__ import annotations

import dataclasses
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, TypeVar

import numpy as np
import torch

S = TypeVar("S")
R = TypeVar("R")


@dataclasses.dataclass(frozen=True)
class Shape:
    """What a reducer may know before the first batch: how many sequences, of what length."""

    n_sequences: int
    seq_len: int


@dataclasses.dataclass(frozen=True)
class Batch:
    """One batch of sequences: their tokens (on the model's device) and where they start."""

    tokens: torch.Tensor  # (batch, seq_len)
    start: int  # index of the first sequence of this batch among all sequences
    index: int  # 0, 1, 2, ... in the order batches are seen

    def keep_mask(self, ignore_tokens: Sequence[int]) -> torch.Tensor:
        """Positions whose token is not one of ``ignore_tokens`` (e.g. BOS), shape (batch, seq_len)."""
        if not ignore_tokens:
            return torch.ones_like(self.tokens, dtype=torch.bool)
        ignored = torch.tensor(list(ignore_tokens), device=self.tokens.device, dtype=self.tokens.dtype)
        return ~torch.isin(self.tokens, ignored)


class Reducer(ABC, Generic[S, R]):
    """Folds a hook's activations, batch after batch, into a state of bounded size."""

    @abstractmethod
    def init(self, shape: Shape) -> S: ...

    @abstractmethod
    def step(self, state: S, activations: torch.Tensor, batch: Batch) -> S: ...

    @abstractmethod
    def finish(self, state: S) -> R: ...


class Apply(Reducer[list[Any], list[Any]]):
    """Transform the activations once (e.g. ``sae.encode``), then feed several reducers."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], *reducers: Reducer[Any, Any]) -> None:
        self.fn = fn
        self.reducers = reducers

    def init(self, shape: Shape) -> list[Any]:
        return [reducer.init(shape) for reducer in self.reducers]

    def step(self, state: list[Any], activations: torch.Tensor, batch: Batch) -> list[Any]:
        transformed = self.fn(activations)
        return [r.step(s, transformed, batch) for r, s in zip(self.reducers, state, strict=True)]

    def finish(self, state: list[Any]) -> list[Any]:
        return [r.finish(s) for r, s in zip(self.reducers, state, strict=True)]


def stop_layer(hook_names: Sequence[str], n_layers: int) -> int | None:
    """The first block the model need not run: one past the deepest hooked block."""
    deepest = -1
    for name in hook_names:
        parts = name.split(".")
        if len(parts) < 3 or parts[0] != "blocks" or not parts[1].isdigit():
            return None  # embeddings, ln_final, unembed: run everything
        deepest = max(deepest, int(parts[1]))
    stop = deepest + 1
    return stop if stop < n_layers else None


def _as_tensor(rows: Any) -> torch.Tensor:
    if isinstance(rows, torch.Tensor):
        return rows.to(torch.long)
    return torch.from_numpy(np.asarray(rows, dtype=np.int64))


@torch.no_grad()
def collect(
    model: Any,
    tokens: torch.Tensor | np.ndarray,
    reducers: Mapping[str, Reducer[Any, Any]],
    batch_size: int = 32,
    progress: bool | str = False,
    model_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Run ``model`` over ``tokens`` (sequences x positions) once per batch; return each hook's result.

    ``tokens`` may be a memory-mapped array: only one batch of it is read at a time.
    ``progress`` shows a progress bar on stderr (a string sets its label).
    """
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be 2-D (sequences, positions), got shape {tuple(tokens.shape)}")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    names = list(reducers)
    n_sequences, seq_len = int(tokens.shape[0]), int(tokens.shape[1])
    states: dict[str, Any] = {name: reducers[name].init(Shape(n_sequences, seq_len)) for name in names}
    device = getattr(model.cfg, "device", None) or "cpu"
    stop_at = stop_layer(names, int(getattr(model.cfg, "n_layers", 0)))
    bar = _progress_bar(progress, n_sequences * seq_len)
    try:
        for index, start in enumerate(range(0, n_sequences, batch_size)):
            batch = Batch(_as_tensor(tokens[start : start + batch_size]).to(device), start, index)

            def fold(activations: torch.Tensor, hook: Any, batch: Batch = batch) -> None:
                states[hook.name] = reducers[hook.name].step(states[hook.name], activations, batch)

            model.run_with_hooks(
                batch.tokens,
                fwd_hooks=[(name, fold) for name in names],
                stop_at_layer=stop_at,
                return_type=None,
                **(model_kwargs or {}),
            )
            if bar is not None:
                bar.update(batch.tokens.numel())
    finally:
        if bar is not None:
            bar.close()
    return {name: reducers[name].finish(states[name]) for name in names}


def _progress_bar(progress: bool | str, total: int) -> Any:
    if not progress:
        return None
    from tqdm import tqdm

    label = progress if isinstance(progress, str) else "collect"
    return tqdm(total=total, desc=label, unit="tok", unit_scale=True, file=sys.stderr, leave=False)
