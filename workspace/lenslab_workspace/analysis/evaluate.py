"""SAELens's own evaluation metrics, on exactly the tokens we choose.

``run_evals`` reads its tokens from an object with SAELens's ``ActivationsStore`` interface
(``get_batch_tokens``, ``reset_input_dataset``, ``context_size``, ``store_batch_size_prompts``);
``TokenRows`` serves our held-out rows through that interface, so every number in
``metrics.json`` is computed by SAELens's code, and a test can call the same functions on the
same rows and get the same result.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

# A feature firing on more than this fraction of tokens is "dense" (counted in metrics.json).
DENSE_THRESHOLD = 0.1

# metrics.json name -> (run_evals group, run_evals name); all computed by SAELens.
SAELENS_METRICS = {
    "ce_loss_score": ("model_performance_preservation", "ce_loss_score"),
    "ce_loss_with_sae": ("model_performance_preservation", "ce_loss_with_sae"),
    "ce_loss_without_sae": ("model_performance_preservation", "ce_loss_without_sae"),
    "ce_loss_with_ablation": ("model_performance_preservation", "ce_loss_with_ablation"),
    "kl_div_score": ("model_behavior_preservation", "kl_div_score"),
    "kl_div_with_sae": ("model_behavior_preservation", "kl_div_with_sae"),
    "kl_div_with_ablation": ("model_behavior_preservation", "kl_div_with_ablation"),
    "l0": ("sparsity", "l0"),
    "l1": ("sparsity", "l1"),
    "explained_variance": ("reconstruction_quality", "explained_variance"),
    "mse": ("reconstruction_quality", "mse"),
    "cossim": ("reconstruction_quality", "cossim"),
    "l2_ratio": ("shrinkage", "l2_ratio"),
    "l2_norm_in": ("shrinkage", "l2_norm_in"),
    "l2_norm_out": ("shrinkage", "l2_norm_out"),
    "relative_reconstruction_bias": ("shrinkage", "relative_reconstruction_bias"),
}

# What the report calls them.
METRIC_LABELS = {
    "ce_loss_score": "CE loss recovered",
    "ce_loss_with_sae": "CE loss with SAE",
    "ce_loss_without_sae": "CE loss clean",
    "ce_loss_with_ablation": "CE loss, zero ablation",
    "kl_div_score": "KL score",
    "kl_div_with_sae": "KL with SAE",
    "kl_div_with_ablation": "KL, zero ablation",
    "l0": "L0",
    "l1": "L1",
    "explained_variance": "Explained variance",
    "mse": "MSE",
    "cossim": "Cosine similarity",
    "l2_ratio": "L2 ratio",
    "l2_norm_in": "L2 norm in",
    "l2_norm_out": "L2 norm out",
    "relative_reconstruction_bias": "Relative reconstruction bias",
    "dead_fraction": "Dead features",
    "dense_fraction": f"Dense features (> {DENSE_THRESHOLD:g} of tokens)",
    "tokens_evaluated": "Tokens evaluated",
}


class TokenRows:
    """Fixed rows of tokens behind SAELens's ActivationsStore interface (the part evals use)."""

    def __init__(self, rows: np.ndarray, batch_size: int, device: str) -> None:
        self.rows = rows
        self.context_size = int(rows.shape[1])
        self.store_batch_size_prompts = batch_size
        self.device = device
        self.position = 0

    def get_batch_tokens(self, batch_size: int | None = None, raise_at_epoch_end: bool = False) -> torch.Tensor:
        size = batch_size or self.store_batch_size_prompts
        if self.position + size > self.rows.shape[0]:
            raise ValueError(
                f"only {self.rows.shape[0]} rows; cannot serve rows {self.position}..{self.position + size}"
            )
        batch = self.rows[self.position : self.position + size]
        self.position += size
        return torch.from_numpy(np.asarray(batch, dtype=np.int64)).to(self.device)

    def reset_input_dataset(self) -> None:
        self.position = 0


def whole_batches(rows: np.ndarray, batch_size: int) -> tuple[np.ndarray, int]:
    """The rows cut to a whole number of batches (SAELens's evals count tokens per batch)."""
    batch_size = max(1, min(batch_size, rows.shape[0]))
    n_batches = rows.shape[0] // batch_size
    return rows[: n_batches * batch_size], batch_size


def saelens_eval_config(n_batches: int, batch_size: int) -> Any:
    """Every scalar metric SAELens has, over ``n_batches`` batches for both of its passes."""
    from sae_lens.evals import EvalConfig

    return EvalConfig(
        batch_size_prompts=batch_size,
        n_eval_reconstruction_batches=n_batches,
        compute_kl=True,
        compute_ce_loss=True,
        n_eval_sparsity_variance_batches=n_batches,
        compute_l2_norms=True,
        compute_sparsity_metrics=True,
        compute_variance_metrics=True,
        compute_featurewise_density_statistics=False,
        compute_featurewise_weight_based_metrics=False,
    )


@torch.no_grad()
def saelens_metrics(
    sae: Any,
    model: Any,
    scaler: Any,
    rows: np.ndarray,
    batch_size: int,
    ignore_tokens: Sequence[int],
    device: str,
    verbose: bool = False,
) -> dict[str, float]:
    """SAELens's ``run_evals`` over ``rows`` (whole batches of them), flattened to one dict."""
    from sae_lens.evals import run_evals

    rows, batch_size = whole_batches(rows, batch_size)
    n_batches = rows.shape[0] // batch_size
    store = TokenRows(rows, batch_size, device)
    nested, _ = run_evals(
        sae,
        store,  # duck-typed: the part of ActivationsStore that evals read
        model,
        scaler,
        saelens_eval_config(n_batches, batch_size),
        exclude_special_tokens=list(ignore_tokens) if ignore_tokens else False,
        verbose=verbose,
    )
    flat = {name: float(nested[group][key]) for name, (group, key) in SAELENS_METRICS.items()}
    flat["tokens_evaluated"] = int(rows.shape[0] * rows.shape[1])
    return flat


def feature_fractions(density: np.ndarray) -> dict[str, float]:
    """Dead (never fired on these tokens) and dense (fired on > DENSE_THRESHOLD) fractions."""
    return {
        "dead_fraction": float(np.mean(density == 0)),
        "dense_fraction": float(np.mean(density > DENSE_THRESHOLD)),
    }


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str] = {}
    for package in ("lenslab-workspace", "sae-lens", "transformer-lens", "torch"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "unknown"
    return found
