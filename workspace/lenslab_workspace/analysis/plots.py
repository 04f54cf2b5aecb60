"""The report's pictures, as PNG files (matplotlib's Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lenslab_workspace.analysis.reducers import HistogramResult

PLOT_FILES = ("feature-density.png", "l0.png", "activations.png")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # before pyplot is imported: never open a window on a headless box
    import matplotlib.pyplot as plt

    return plt


def density_figure(density: np.ndarray) -> Any:
    """Histogram of log10(feature density); dead features are counted in the title."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    alive = density[density > 0]
    if len(alive):
        ax.hist(np.log10(alive), bins=50, color="#3b6ea8")
    ax.set_xlabel("log10(feature density)")
    ax.set_ylabel("features")
    ax.set_title(f"Feature density ({int(np.sum(density == 0))} dead of {len(density)})")
    fig.tight_layout()
    return fig


def l0_figure(l0: HistogramResult) -> Any:
    """Distribution of the number of active features per token."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    centers = (l0.edges[:-1] + l0.edges[1:]) / 2
    counts = np.asarray(l0.counts, dtype=float)
    used = np.flatnonzero(counts)
    if len(used):
        lo, hi = used[0], used[-1] + 1
        ax.bar(centers[lo:hi], counts[lo:hi], width=1.0, color="#3b6ea8")
    total = counts.sum()
    mean = float((centers * counts).sum() / total) if total else 0.0
    ax.set_xlabel("active features per token (L0)")
    ax.set_ylabel("tokens")
    ax.set_title(f"L0 distribution (mean {mean:.1f})")
    fig.tight_layout()
    return fig


def activations_figure(hist: HistogramResult, features: list[int]) -> Any:
    """Histogram of log10(activation) of a few sampled features, one panel each."""
    plt = _pyplot()
    n = max(1, len(features))
    cols = min(4, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.2 * rows), dpi=100, squeeze=False)
    centers = (hist.edges[:-1] + hist.edges[1:]) / 2
    width = hist.edges[1] - hist.edges[0]
    for i, ax in enumerate(axes.flat):
        if i >= len(features):
            ax.axis("off")
            continue
        counts = np.asarray(hist.counts[i], dtype=float)
        if counts.sum():
            used = np.flatnonzero(counts)
            lo, hi = max(0, used[0] - 3), min(len(counts), used[-1] + 4)  # zoom on the occupied bins
            ax.bar(centers[lo:hi], counts[lo:hi], width=width, color="#c0504d")
            ax.set_title(f"feature {features[i]}", fontsize=9)
        else:
            ax.set_title(f"feature {features[i]} (never fired)", fontsize=9)
        ax.set_xlabel("log10(activation)", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return fig


def save(fig: Any, path: Path) -> Path:
    plt = _pyplot()
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def write_plots(directory: Path, density: np.ndarray, l0: HistogramResult, activations: HistogramResult,
                sampled: list[int]) -> list[Path]:  # fmt: skip
    figures = (density_figure(density), l0_figure(l0), activations_figure(activations, sampled))
    return [save(fig, directory / name) for fig, name in zip(figures, PLOT_FILES, strict=True)]
