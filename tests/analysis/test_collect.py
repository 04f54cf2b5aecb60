"""The reduce-style collection API against plain torch on the same activations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lenslab_workspace.analysis import (
    Apply,
    FeatureStats,
    Histogram,
    MeanVar,
    ToMemmap,
    TopKContexts,
    collect,
    sae_encoder,
)

HOOKS = ("blocks.0.hook_resid_post", "blocks.1.hook_mlp_out")
BOS = 256


@pytest.fixture(scope="module")
def model() -> Any:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=2, d_model=32, n_heads=2, d_head=16, d_mlp=64, d_vocab=257, n_ctx=64, act_fn="gelu", seed=1,
        device="cpu",
    )  # fmt: skip
    return HookedTransformer(cfg).eval()


@pytest.fixture(scope="module")
def tokens() -> np.ndarray:
    # A small corpus: 45 sequences of 24 tokens, each starting with BOS (as the trainer makes them).
    rng = np.random.default_rng(3)
    rows = rng.integers(0, 256, size=(45, 24))
    rows[:, 0] = BOS
    return rows


@pytest.fixture(scope="module")
def sae() -> Any:
    from sae_lens import StandardSAE, StandardSAEConfig

    torch.manual_seed(0)
    sae = StandardSAE(StandardSAEConfig(d_in=32, d_sae=96))
    with torch.no_grad():  # a bias that leaves most features off most of the time, like a trained SAE
        sae.b_enc.fill_(-2.0)
    return sae.eval()


def cached(model: Any, tokens: np.ndarray, hook: str) -> torch.Tensor:
    _, cache = model.run_with_cache(torch.from_numpy(tokens), names_filter=[hook])
    activations: torch.Tensor = cache[hook]
    return activations


def test_welford_mean_and_variance_equal_torch_on_every_hook(model: Any, tokens: np.ndarray) -> None:
    # A batch size that does not divide the number of sequences: the last batch is short.
    result = collect(model, tokens, {h: MeanVar() for h in HOOKS}, batch_size=7)
    for hook in HOOKS:
        flat = cached(model, tokens, hook).reshape(-1, 32).double()
        mean, var = result[hook]
        torch.testing.assert_close(mean, flat.mean(dim=0), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(var, flat.var(dim=0), rtol=1e-9, atol=1e-9)


def test_ignored_tokens_are_left_out_of_the_statistics(model: Any, tokens: np.ndarray) -> None:
    mean, var = collect(model, tokens, {HOOKS[0]: MeanVar(unbiased=False, ignore_tokens=[BOS])}, batch_size=8)[HOOKS[0]]
    without_bos = cached(model, tokens, HOOKS[0])[:, 1:].reshape(-1, 32).double()
    torch.testing.assert_close(mean, without_bos.mean(dim=0))
    torch.testing.assert_close(var, without_bos.var(dim=0, unbiased=False))


def test_histogram_equals_numpy(model: Any, tokens: np.ndarray) -> None:
    hist = collect(model, tokens, {HOOKS[0]: Histogram(20, -1.0, 1.0)}, batch_size=10)[HOOKS[0]]
    values = cached(model, tokens, HOOKS[0]).double().numpy().ravel()
    expected, _ = np.histogram(values[(values >= -1) & (values < 1)], bins=20, range=(-1, 1))
    assert hist.counts.tolist() == expected.tolist()
    assert hist.underflow == int(np.sum(values < -1)) and hist.overflow == int(np.sum(values >= 1))
    assert hist.counts.sum() + hist.underflow + hist.overflow == values.size


def test_top_k_contexts_equal_brute_force(model: Any, tokens: np.ndarray, sae: Any) -> None:
    k = 5
    result = collect(model, tokens, {HOOKS[0]: TopKContexts(k, sae=sae, ignore_tokens=[BOS])}, batch_size=4)[HOOKS[0]]
    with torch.no_grad():
        features = sae.encode(cached(model, tokens, HOOKS[0])).numpy()  # (seq, pos, feature)
    features[:, 0, :] = -np.inf  # BOS positions are ignored
    checked = 0
    for feature in range(features.shape[2]):
        column = features[:, :, feature].ravel()
        expected = np.sort(column)[::-1][:k]
        np.testing.assert_allclose(result.values[feature], expected, rtol=1e-5, atol=1e-6)
        for value, seq, pos in zip(
            result.values[feature], result.sequence[feature], result.position[feature], strict=True
        ):
            # Each reported place really holds the reported value (robust to ties).
            assert pos != 0
            assert features[seq, pos, feature] == pytest.approx(value, rel=1e-5, abs=1e-6)
            checked += 1
        # contexts() keeps only the positions where the feature fired.
        assert [c[0] for c in result.contexts(feature)] == [float(v) for v in result.values[feature] if v != 0]
    assert checked == k * features.shape[2]
    assert (result.values > 0).any() and (result.values == 0).any(), "the corpus should have live and dead features"


def test_feature_stats_and_apply_share_one_encoding(model: Any, tokens: np.ndarray, sae: Any) -> None:
    calls: list[int] = []
    encode = sae_encoder(sae)

    def counted(acts: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return encode(acts)

    reducer = Apply(counted, FeatureStats(), TopKContexts(3))
    stats, top = collect(model, tokens, {HOOKS[0]: reducer}, batch_size=9)[HOOKS[0]]
    assert len(calls) == 5  # once per batch, for both reducers
    with torch.no_grad():
        features = sae.encode(cached(model, tokens, HOOKS[0])).reshape(-1, 96).double().numpy()
    active = features != 0
    np.testing.assert_allclose(stats.density, active.mean(axis=0))
    np.testing.assert_allclose(stats.max, features.max(axis=0), rtol=1e-6)
    fired = active.any(axis=0)
    expected_mean = (features * active).sum(axis=0)[fired] / active.sum(axis=0)[fired]
    np.testing.assert_allclose(stats.mean_active[fired], expected_mean, rtol=1e-6)
    np.testing.assert_allclose(top.values[:, 0], features.max(axis=0), rtol=1e-6)
    assert stats.n_tokens == tokens.size


def test_memmap_reducer_writes_every_activation_it_saw(model: Any, tokens: np.ndarray, tmp_path: Path) -> None:
    target = tmp_path / "acts.npy"
    path = collect(model, tokens, {HOOKS[1]: ToMemmap(target)}, batch_size=6)[HOOKS[1]]
    assert path == target
    written = np.load(target, mmap_mode="r")
    assert written.shape == (45, 24, 32) and written.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(written), cached(model, tokens, HOOKS[1]).numpy())


def test_tokens_may_be_a_memory_mapped_array(model: Any, tokens: np.ndarray, tmp_path: Path) -> None:
    np.save(tmp_path / "tokens.npy", tokens.astype(np.int32))
    mapped = np.load(tmp_path / "tokens.npy", mmap_mode="r")
    from_disk = collect(model, mapped, {HOOKS[0]: MeanVar()}, batch_size=16)[HOOKS[0]]
    in_memory = collect(model, torch.from_numpy(tokens), {HOOKS[0]: MeanVar()}, batch_size=16)[HOOKS[0]]
    torch.testing.assert_close(from_disk, in_memory)


def test_bad_tokens_are_refused(model: Any) -> None:
    with pytest.raises(ValueError, match="2-D"):
        collect(model, np.zeros(10, dtype=np.int64), {HOOKS[0]: MeanVar()})
