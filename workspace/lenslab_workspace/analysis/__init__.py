"""What did the SAE learn: a reduce-style collection API over TransformerLens hooks, SAELens's
evaluation metrics, per-feature statistics and top contexts, plots, and an offline report."""

from __future__ import annotations

from lenslab_workspace.analysis.collect import Apply, Batch, Reducer, Shape, collect
from lenslab_workspace.analysis.reducers import (
    FeatureStats,
    Histogram,
    MeanVar,
    ToMemmap,
    TopKContexts,
    sae_encoder,
)

__all__ = [
    "Apply",
    "Batch",
    "FeatureStats",
    "Histogram",
    "MeanVar",
    "Reducer",
    "Shape",
    "ToMemmap",
    "TopKContexts",
    "collect",
    "sae_encoder",
]
