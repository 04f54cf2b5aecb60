"""``prefetch_llm_batches``: the model's batches are made ahead in a thread, the batches served are
those without prefetch, and a state taken with batches in flight resumes to the same batches."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lenslab_workspace.train.config import load_run_file
from lenslab_workspace.train.data import ActivationStream, prefetch_depth

from .conftest import wait_for, write_run_file

N_BATCHES = 40  # several refills and an epoch boundary of the 96-row array below


class CountingModel:
    """The tiny-random model, counting its forward passes (to see the thread run ahead)."""

    def __init__(self, model: Any) -> None:
        self.model, self.cfg, self.passes = model, model.cfg, 0

    def run_with_cache(self, *args: Any, **kwargs: Any) -> Any:
        self.passes += 1
        return self.model.run_with_cache(*args, **kwargs)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Any, np.ndarray]:
    from lenslab_workspace.train.models import load_language_model

    tmp = tmp_path_factory.mktemp("prefetch")
    settings = load_run_file(write_run_file(tmp / "run.toml", {"train_batch_size_tokens": 256}))
    model, _, _ = load_language_model(settings, "cpu")
    tokens = np.random.default_rng(0).integers(0, 200, size=(96, 32), dtype=np.int32)
    return settings.runner_fields, model, tokens


def batches(stream: ActivationStream, count: int, close: bool = False) -> list[torch.Tensor]:
    served = [next(stream).clone() for _ in range(count)]
    if close:  # the model is not thread-safe: no thread of an old stream may still run it
        stream.close()
    return served


def make(setup: tuple[dict[str, Any], Any, np.ndarray], prefetch: bool | int) -> ActivationStream:
    fields, model, tokens = setup
    return ActivationStream(CountingModel(model), tokens, {**fields, "prefetch_llm_batches": prefetch}, 32, None)


def test_depth_follows_saelens_meaning() -> None:
    base = {"context_size": 32, "n_batches_in_buffer": 64, "store_batch_size_prompts": 16}
    assert prefetch_depth(base) == 0 and prefetch_depth({**base, "prefetch_llm_batches": 0}) == 0
    # true is 1 (as in SAELens): one refill's model batches (64 x 32 x 0.5 / (16 x 32) = 2).
    assert prefetch_depth({**base, "prefetch_llm_batches": True}) == 2
    assert prefetch_depth({**base, "prefetch_llm_batches": 3}) == 6


def test_same_batches_as_without_prefetch_and_the_thread_runs_ahead(setup: Any) -> None:
    torch.manual_seed(1)
    plain = batches(make(setup, False), N_BATCHES, close=True)
    torch.manual_seed(1)
    stream = make(setup, 2)
    first = next(stream).clone()
    model = stream.model
    assert isinstance(model, CountingModel)
    taken = (stream.position // stream.store_batch_size) if stream.epoch == 0 else 0
    wait_for(lambda: model.passes > taken, timeout=30, what="a model batch made ahead")
    rest = batches(stream, N_BATCHES - 1)
    assert stream.epoch >= 1  # the epoch boundary was crossed by the prefetch thread too
    for a, b in zip(plain, [first, *rest], strict=True):
        assert torch.equal(a, b)
    stream.close()
    assert not [t for t in threading.enumerate() if t.name == "lenslab-prefetch"]


@pytest.mark.parametrize("cut", [3, 17, 29])
def test_a_state_taken_with_batches_in_flight_resumes_exactly(setup: Any, cut: int) -> None:
    torch.manual_seed(2)
    whole = batches(make(setup, 1), N_BATCHES, close=True)
    torch.manual_seed(2)
    stream = make(setup, 3)
    batches(stream, cut)
    state, rng = stream.state_dict(), torch.get_rng_state()
    stream.close()
    resumed = make(setup, 3)
    resumed.load_state_dict(state, "cpu")
    torch.set_rng_state(rng)
    tail = batches(resumed, N_BATCHES - cut)
    resumed.close()
    for a, b in zip(whole[cut:], tail, strict=True):
        assert torch.equal(a, b)


def test_an_error_in_the_thread_reaches_the_trainer(setup: Any) -> None:
    stream = make(setup, True)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("model failed")

    stream.model.run_with_cache = broken
    with pytest.raises(RuntimeError, match="model failed"):
        next(stream)
    stream.close()


def test_the_prefetched_run_file_is_accepted(tmp_path: Path) -> None:
    settings = load_run_file(write_run_file(tmp_path / "run.toml", {"prefetch_llm_batches": 4}))
    assert settings.runner_config().prefetch_llm_batches == 4
