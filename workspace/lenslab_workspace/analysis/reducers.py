"""Ready reducers for ``collect``: mean/variance, histograms, SAE feature statistics, top-k
activating contexts, and streaming activations to a memory-mapped ``.npy`` file.

Every state is a small frozen value; ``step`` returns a new one. Statistics accumulate in
float64 (sums over millions of tokens lose precision in float32), on the activations' device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from lenslab_workspace.analysis.collect import Batch, Reducer, Shape


def sae_encoder(sae: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """``sae.encode`` on the SAE's device and dtype, as a function of the hook's activations."""

    def encode(activations: torch.Tensor) -> torch.Tensor:
        features: torch.Tensor = sae.encode(activations.to(sae.device, sae.dtype))
        return features.to_dense() if features.is_sparse else features

    return encode


def _rows(activations: torch.Tensor, batch: Batch, ignore_tokens: Sequence[int]) -> torch.Tensor:
    """(tokens, features) of the positions that count: leading (batch, pos) dims flattened."""
    flat = activations.reshape(activations.shape[0] * activations.shape[1], -1)
    if ignore_tokens:
        flat = flat[batch.keep_mask(ignore_tokens).reshape(-1).to(flat.device)]
    return flat


# --- mean and variance -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MeanVarState:
    count: int
    mean: torch.Tensor | None
    m2: torch.Tensor | None


class MeanVar(Reducer[MeanVarState, tuple[torch.Tensor, torch.Tensor]]):
    """Per-dimension mean and variance over all positions (Welford/Chan, merged per batch)."""

    def __init__(self, unbiased: bool = True, ignore_tokens: Sequence[int] = ()) -> None:
        self.unbiased = unbiased
        self.ignore_tokens = tuple(ignore_tokens)

    def init(self, shape: Shape) -> MeanVarState:
        return MeanVarState(0, None, None)

    def step(self, state: MeanVarState, activations: torch.Tensor, batch: Batch) -> MeanVarState:
        x = _rows(activations, batch, self.ignore_tokens).to(torch.float64)
        n = x.shape[0]
        if n == 0:
            return state
        batch_mean = x.mean(dim=0)
        batch_m2 = ((x - batch_mean) ** 2).sum(dim=0)
        if state.mean is None or state.m2 is None:
            return MeanVarState(n, batch_mean, batch_m2)
        total = state.count + n
        delta = batch_mean - state.mean
        mean = state.mean + delta * (n / total)
        m2 = state.m2 + batch_m2 + delta**2 * (state.count * n / total)
        return MeanVarState(total, mean, m2)

    def finish(self, state: MeanVarState) -> tuple[torch.Tensor, torch.Tensor]:
        if state.mean is None or state.m2 is None:
            raise ValueError("MeanVar saw no activations")
        denominator = state.count - 1 if self.unbiased else state.count
        return state.mean, state.m2 / max(denominator, 1)


# --- histograms --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HistogramResult:
    edges: np.ndarray  # (bins + 1,)
    counts: np.ndarray  # (columns, bins), or (bins,) over all values
    underflow: np.ndarray
    overflow: np.ndarray


class Histogram(Reducer[torch.Tensor | None, HistogramResult]):
    """Counts of values in ``bins`` equal bins on [lo, hi), plus under- and overflow.

    ``columns`` keeps one histogram per chosen index of the last dimension (e.g. sampled SAE
    features), or per index when ``"all"``; ``nonzero_only`` skips exact zeros (inactive features).
    """

    def __init__(
        self,
        bins: int,
        lo: float,
        hi: float,
        columns: Sequence[int] | Literal["all"] | None = None,
        nonzero_only: bool = False,
        log10: bool = False,
        ignore_tokens: Sequence[int] = (),
    ) -> None:
        if bins < 1 or not hi > lo:
            raise ValueError("Histogram needs bins >= 1 and hi > lo")
        self.bins, self.lo, self.hi = bins, lo, hi
        self.columns: list[int] | Literal["all"] | None = (
            columns if columns is None or isinstance(columns, str) else list(columns)
        )
        self.nonzero_only = nonzero_only
        self.log10 = log10
        self.ignore_tokens = tuple(ignore_tokens)

    def init(self, shape: Shape) -> torch.Tensor | None:
        return None  # created on the activations' device at the first batch

    def step(self, state: torch.Tensor | None, activations: torch.Tensor, batch: Batch) -> torch.Tensor:
        x = _rows(activations, batch, self.ignore_tokens)
        if self.columns == "all":
            pass
        elif self.columns is not None:
            x = x[:, self.columns]
        else:
            x = x.reshape(-1, 1)
        n_columns = x.shape[1]
        mask = x != 0 if self.nonzero_only else None
        if self.log10:
            mask = x > 0 if mask is None else mask & (x > 0)
        # Only the counted entries are binned: cheap for sparse SAE activations.
        if mask is None:
            values = x.reshape(-1).to(torch.float64)
            column = torch.arange(n_columns, device=x.device).repeat(x.shape[0])
        else:
            where = mask.nonzero()
            values = x[where[:, 0], where[:, 1]].to(torch.float64)
            column = where[:, 1]
        if self.log10:
            values = torch.log10(values)
        # Bin index 0 is underflow, bins + 1 overflow; one bincount over (column, bin) pairs.
        scaled = (values - self.lo) / (self.hi - self.lo) * self.bins
        index = torch.clamp(torch.floor(scaled), -1, self.bins).to(torch.long) + 1
        flat = index + column * (self.bins + 2)
        counts = torch.bincount(flat, minlength=n_columns * (self.bins + 2)).reshape(n_columns, -1)
        return counts if state is None else state + counts

    def finish(self, state: torch.Tensor | None) -> HistogramResult:
        if state is None:
            raise ValueError("Histogram saw no activations")
        counts = state.cpu().numpy()
        edges = np.linspace(self.lo, self.hi, self.bins + 1)
        if self.columns is None:
            return HistogramResult(edges, counts[0, 1:-1], counts[0, 0], counts[0, -1])
        return HistogramResult(edges, counts[:, 1:-1], counts[:, 0], counts[:, -1])


# --- SAE features ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FeatureStatsState:
    n_tokens: int
    active: torch.Tensor | None
    total: torch.Tensor | None
    max: torch.Tensor | None


@dataclasses.dataclass(frozen=True)
class FeatureStatsResult:
    n_tokens: int
    density: np.ndarray  # fraction of tokens on which the feature is non-zero
    mean_active: np.ndarray  # mean activation over the tokens where it is non-zero
    max: np.ndarray  # largest activation (0 for a feature that never fired)


class FeatureStats(Reducer[FeatureStatsState, FeatureStatsResult]):
    """Per feature: how often it fires, its mean activation when it does, its maximum."""

    def __init__(self, sae: Any = None, ignore_tokens: Sequence[int] = ()) -> None:
        self.encode = sae_encoder(sae) if sae is not None else None
        self.ignore_tokens = tuple(ignore_tokens)

    def init(self, shape: Shape) -> FeatureStatsState:
        return FeatureStatsState(0, None, None, None)

    def step(self, state: FeatureStatsState, activations: torch.Tensor, batch: Batch) -> FeatureStatsState:
        features = self.encode(activations) if self.encode is not None else activations
        x = _rows(features, batch, self.ignore_tokens)
        active = (x != 0).sum(dim=0, dtype=torch.float64)
        total = x.sum(dim=0, dtype=torch.float64)
        top = x.max(dim=0).values.to(torch.float64) if x.shape[0] else torch.zeros_like(total)
        if state.active is None or state.total is None or state.max is None:
            return FeatureStatsState(x.shape[0], active, total, top)
        return FeatureStatsState(
            state.n_tokens + x.shape[0], state.active + active, state.total + total, torch.maximum(state.max, top)
        )

    def finish(self, state: FeatureStatsState) -> FeatureStatsResult:
        if state.active is None or state.total is None or state.max is None:
            raise ValueError("FeatureStats saw no activations")
        active = state.active.cpu().numpy()
        total = state.total.cpu().numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_active = np.where(active > 0, total / np.maximum(active, 1), 0.0)
        return FeatureStatsResult(
            state.n_tokens, active / max(state.n_tokens, 1), mean_active, np.maximum(state.max.cpu().numpy(), 0.0)
        )


@dataclasses.dataclass(frozen=True)
class TopKState:
    values: torch.Tensor | None  # (features, k), descending
    sequence: torch.Tensor | None  # (features, k) index of the sequence among all sequences
    position: torch.Tensor | None  # (features, k) position in that sequence


@dataclasses.dataclass(frozen=True)
class TopKResult:
    values: np.ndarray  # (features, k), descending; -inf where fewer than k positions were seen
    sequence: np.ndarray  # (features, k)
    position: np.ndarray  # (features, k)

    def contexts(self, feature: int) -> list[tuple[float, int, int]]:
        """(value, sequence, position) of the feature's top activations that are non-zero."""
        return [
            (float(v), int(s), int(p))
            for v, s, p in zip(self.values[feature], self.sequence[feature], self.position[feature], strict=True)
            if np.isfinite(v) and v != 0
        ]


class TopKContexts(Reducer[TopKState, TopKResult]):
    """Per feature, its ``k`` largest activations and where they happened, kept on the device.

    Each batch's own top-k (one ``torch.topk`` over the batch's positions) is merged with the
    running top-k (a second ``torch.topk`` over 2k candidates), so the state is 3 x features x k.
    """

    def __init__(self, k: int, sae: Any = None, ignore_tokens: Sequence[int] = ()) -> None:
        if k < 1:
            raise ValueError("TopKContexts needs k >= 1")
        self.k = k
        self.encode = sae_encoder(sae) if sae is not None else None
        self.ignore_tokens = tuple(ignore_tokens)

    def init(self, shape: Shape) -> TopKState:
        return TopKState(None, None, None)

    def step(self, state: TopKState, activations: torch.Tensor, batch: Batch) -> TopKState:
        features = self.encode(activations) if self.encode is not None else activations
        n_seq, seq_len = features.shape[0], features.shape[1]
        x = features.reshape(n_seq * seq_len, -1).float()
        if self.ignore_tokens:
            keep = batch.keep_mask(self.ignore_tokens).reshape(-1, 1).to(x.device)
            x = torch.where(keep, x, torch.full_like(x, float("-inf")))
        k = min(self.k, x.shape[0])
        values, flat = torch.topk(x.T, k, dim=1)
        sequence = flat // seq_len + batch.start
        position = flat % seq_len
        if state.values is None or state.sequence is None or state.position is None:
            return self._pad(values, sequence, position)
        merged_values, pick = torch.topk(torch.cat([state.values, values], dim=1), self.k, dim=1)
        merged_sequence = torch.gather(torch.cat([state.sequence, sequence], dim=1), 1, pick)
        merged_position = torch.gather(torch.cat([state.position, position], dim=1), 1, pick)
        return TopKState(merged_values, merged_sequence, merged_position)

    def _pad(self, values: torch.Tensor, sequence: torch.Tensor, position: torch.Tensor) -> TopKState:
        missing = self.k - values.shape[1]
        if missing > 0:  # a first batch with fewer than k positions
            values = torch.cat([values, torch.full_like(values[:, :1], float("-inf")).expand(-1, missing)], dim=1)
            sequence = torch.cat([sequence, torch.zeros_like(sequence[:, :1]).expand(-1, missing)], dim=1)
            position = torch.cat([position, torch.zeros_like(position[:, :1]).expand(-1, missing)], dim=1)
        return TopKState(values, sequence, position)

    def finish(self, state: TopKState) -> TopKResult:
        if state.values is None or state.sequence is None or state.position is None:
            raise ValueError("TopKContexts saw no activations")
        return TopKResult(state.values.cpu().numpy(), state.sequence.cpu().numpy(), state.position.cpu().numpy())


# --- streaming to disk -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MemmapState:
    array: np.memmap | None


class ToMemmap(Reducer[MemmapState, Path]):
    """Write every activation to a ``.npy`` file (sequences, positions, ...) as batches arrive.

    Open the result with ``np.load(path, mmap_mode="r")``; RAM holds one batch at a time.
    """

    def __init__(self, path: str | Path, dtype: str = "float32") -> None:
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self._shape: Shape | None = None

    def init(self, shape: Shape) -> MemmapState:
        self._shape = shape
        return MemmapState(None)

    def step(self, state: MemmapState, activations: torch.Tensor, batch: Batch) -> MemmapState:
        array = state.array
        if array is None:
            assert self._shape is not None, "init() is called before step()"
            shape = (self._shape.n_sequences, *activations.shape[1:])
            array = np.lib.format.open_memmap(self.path, mode="w+", dtype=self.dtype, shape=shape)
        rows = activations.detach().to("cpu", torch.float32).numpy().astype(self.dtype, copy=False)
        array[batch.start : batch.start + rows.shape[0]] = rows
        return MemmapState(array)

    def finish(self, state: MemmapState) -> Path:
        if state.array is not None:
            state.array.flush()
        return self.path
