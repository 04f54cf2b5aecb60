"""Per-feature statistics and top activating contexts, from one ``collect`` pass.

The pass keeps, per feature, its density, mean and max activation and its top-k
(value, sequence, position); a second, small pass re-runs only the sequences that hold a
chosen feature's top activations, to read that feature's activation on every token of the
context window shown in the report.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from lenslab_workspace.analysis.collect import Apply, collect
from lenslab_workspace.analysis.reducers import (
    FeatureStats,
    FeatureStatsResult,
    Histogram,
    HistogramResult,
    TopKContexts,
    TopKResult,
    sae_encoder,
)

BEFORE, AFTER = 12, 4  # tokens shown around the activating one
ACT_LOG10_RANGE = (-4.0, 3.0)  # activation histograms bin log10(activation) on this range
ACT_BINS = 280  # 0.025 decades each
N_SAMPLED_HISTOGRAMS = 8  # features whose activation histograms are plotted (drawn among those that fired)
MAX_HISTOGRAM_FEATURES = 16384  # x 282 int64 counts: 37 MB at most


@dataclasses.dataclass
class FeaturePass:
    stats: FeatureStatsResult
    top: TopKResult
    l0: HistogramResult  # L0 per token
    activations: HistogramResult  # log10 activation of the sampled features
    sampled: list[int]  # which features those are


def sae_input(sae: Any, scaler: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """The hook's activations -> the SAE's feature activations, the way SAELens's evals do it."""
    encode = sae_encoder(sae)
    head = sae.cfg.metadata.hook_head_index
    hook_name = sae.cfg.metadata.hook_name or ""

    def features(activations: torch.Tensor) -> torch.Tensor:
        if head is not None:
            activations = activations[:, :, head]
        elif any(part in hook_name for part in ("hook_q", "hook_k", "hook_v", "hook_z")):
            activations = activations.flatten(-2, -1)
        return encode(scaler.scale(activations))

    return features


def feature_pass(
    model: Any,
    sae: Any,
    scaler: Any,
    rows: np.ndarray,
    top_k: int,
    ignore_tokens: Sequence[int],
    batch_size: int,
    progress: bool = False,
) -> FeaturePass:
    d_sae = int(sae.cfg.d_sae)
    # One histogram per feature (features x 282 counts) unless that gets big; then a sample.
    columns: list[int] | Literal["all"] = "all"
    if d_sae > MAX_HISTOGRAM_FEATURES:
        columns = sorted(np.random.default_rng(0).choice(d_sae, MAX_HISTOGRAM_FEATURES, replace=False).tolist())
    ignore = tuple(ignore_tokens)
    reducer = Apply(
        sae_input(sae, scaler),
        FeatureStats(ignore_tokens=ignore),
        TopKContexts(top_k, ignore_tokens=ignore),
        Apply(
            lambda f: (f != 0).sum(dim=-1, keepdim=True).float(),
            Histogram(d_sae + 1, -0.5, d_sae + 0.5, ignore_tokens=ignore),
        ),
        Histogram(ACT_BINS, *ACT_LOG10_RANGE, columns=columns, log10=True, ignore_tokens=ignore),
    )
    hook = sae.cfg.metadata.hook_name
    result = collect(model, rows, {hook: reducer}, batch_size=batch_size, progress="features" if progress else False)
    stats, top, (l0,), activations = result[hook]
    histogrammed = np.arange(d_sae) if columns == "all" else np.asarray(columns)
    alive = np.flatnonzero(stats.density[histogrammed] > 0)
    picked = np.random.default_rng(0).choice(alive, min(N_SAMPLED_HISTOGRAMS, len(alive)), replace=False)
    picked.sort()
    sampled = HistogramResult(activations.edges, activations.counts[picked], activations.underflow[picked],
                              activations.overflow[picked])  # fmt: skip
    return FeaturePass(stats, top, l0, sampled, histogrammed[picked].tolist())


def choose_features(stats: FeatureStatsResult, n: int) -> list[int]:
    """``n`` features that fired, drawn at random (fixed seed), in index order."""
    alive = np.flatnonzero(stats.density > 0)
    if len(alive) <= n:
        return alive.tolist()
    return sorted(np.random.default_rng(0).choice(alive, n, replace=False).tolist())


def token_strings(tokenizer: Any, ids: Sequence[int]) -> dict[int, str]:
    """Readable text of each distinct token id (bytes for the tiny model's byte tokenizer)."""
    from lenslab_workspace.train.data import ByteTokenizer

    distinct = sorted(set(int(i) for i in ids))
    if isinstance(tokenizer, ByteTokenizer):
        return {i: "<bos>" if i == tokenizer.bos_token_id else _byte_text(i) for i in distinct}
    if tokenizer is None:
        return {i: f"<{i}>" for i in distinct}
    texts = tokenizer.batch_decode([[i] for i in distinct])
    return dict(zip(distinct, texts, strict=True))


def _byte_text(value: int) -> str:
    char = chr(value)
    return char if value < 128 and (char.isprintable() or char == " ") else f"\\x{value:02x}"


@torch.no_grad()
def feature_records(
    model: Any,
    sae: Any,
    scaler: Any,
    tokenizer: Any,
    rows: np.ndarray,
    found: FeaturePass,
    chosen: Sequence[int],
    batch_size: int,
) -> list[dict[str, Any]]:
    """One record per feature: stats for all of them, contexts for the ``chosen`` ones."""
    wanted = {f: found.top.contexts(f) for f in chosen}
    windows = _context_activations(model, sae, scaler, rows, wanted, batch_size)
    texts = token_strings(tokenizer, np.unique(rows).tolist())
    records: list[dict[str, Any]] = []
    for feature in range(len(found.stats.density)):
        contexts = []
        for value, seq, pos in wanted.get(feature, []):
            lo, hi = max(0, pos - BEFORE), min(rows.shape[1], pos + AFTER + 1)
            contexts.append(
                {
                    "value": value,
                    "sequence": seq,
                    "position": pos,
                    "focus": pos - lo,
                    "tokens": [texts[int(t)] for t in rows[seq, lo:hi]],
                    "activations": [round(float(a), 5) for a in windows[(feature, seq)][lo:hi]],
                }
            )
        records.append(
            {
                "feature": feature,
                "density": float(found.stats.density[feature]),
                "mean_activation": float(found.stats.mean_active[feature]),
                "max_activation": float(found.stats.max[feature]),
                "contexts": contexts,
            }
        )
    return records


def _context_activations(
    model: Any,
    sae: Any,
    scaler: Any,
    rows: np.ndarray,
    wanted: dict[int, list[tuple[float, int, int]]],
    batch_size: int,
) -> dict[tuple[int, int], np.ndarray]:
    """(feature, sequence) -> that feature's activation at every position of that sequence."""
    by_sequence: dict[int, set[int]] = {}
    for feature, contexts in wanted.items():
        for _, seq, _ in contexts:
            by_sequence.setdefault(seq, set()).add(feature)
    sequences = sorted(by_sequence)
    hook = sae.cfg.metadata.hook_name
    encode = sae_input(sae, scaler)
    out: dict[tuple[int, int], np.ndarray] = {}
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        tokens = torch.from_numpy(np.asarray(rows[chunk], dtype=np.int64)).to(model.cfg.device)
        _, cache = model.run_with_cache(tokens, names_filter=[hook], return_type=None)
        features = encode(cache[hook]).float().cpu().numpy()
        for i, seq in enumerate(chunk):
            for feature in by_sequence[seq]:
                out[(feature, seq)] = features[i, :, feature]
    return out


def write_features(records: list[dict[str, Any]], directory: Path) -> Path:
    """``features.parquet`` when pyarrow is installed, else ``features.jsonl``; written atomically."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        target = directory / "features.jsonl"
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        with open(tmp, "w") as handle:
            for record in records:
                handle.write(json.dumps(record) + "\n")
        os.replace(tmp, target)
        return target
    target = directory / "features.parquet"
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    pq.write_table(pa.Table.from_pylist(records), str(tmp))
    os.replace(tmp, target)
    return target
