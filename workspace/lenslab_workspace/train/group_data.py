"""Activations for a group of SAEs: one model pass per token batch, one stream per SAE's batches.

Trained alone, an SAE's batches depend on three things: the token rows (shared by the whole
group), its hook's activations for them, and the torch RNG that shuffles its mixing buffer.
That RNG is the global one, left where the SAE's initialisation left it, so two SAEs that
draw different amounts of randomness when they are made (another width, another
architecture) are served differently mixed batches even on the same hook.

So a group keeps one ``GroupStream`` per distinct (hook, RNG state after the SAE was made,
whether the SAE's norm estimate reads batches first); SAEs with the same key share it (a
sweep over sparsity or learning rate shares one per hook). Each stream shuffles with its own
RNG state, swapped in for the shuffle only, and takes its activations from ``SharedForward``,
which runs the model once per token batch for every hook of the group. Streams in lockstep
ask for the same token batch one after the other and get the cached pass.

With ``prefetch_llm_batches`` each stream makes its model batches ahead in its own thread, as a
single run's stream does (prefetch.py): the threads take turns at the model under one lock
(TransformerLens's ``run_with_cache`` is not thread-safe) and find the batch a stream of the
same lane asked for first in the cache. What is served is unchanged: a model batch is a
function of its token rows only, and the mixing still runs in the training thread.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from lenslab_workspace.train.data import ActivationStream, prefetch_depth
from lenslab_workspace.train.tokenfile import TokenRows


def cache_size(runner: dict[str, Any], n_streams: int) -> int:
    """Model passes ``SharedForward`` keeps: enough that every stream of a lane finds the batches
    its first stream asked for, which run ahead of it by at most one refill (the first one
    fills the whole buffer) plus what a prefetch thread makes ahead."""
    context = len(range(runner.get("context_size", 128))[slice(*runner.get("seqpos_slice", (None,)))])
    per_batch = max(1, int(runner.get("store_batch_size_prompts", 32)) * context)
    refill = math.ceil(int(runner.get("n_batches_in_buffer", 20)) * context / per_batch)
    return n_streams * (refill + prefetch_depth(runner) + 1) + 1


class SharedForward:
    """The model's activations at every hook of the group, one pass per token batch."""

    def __init__(self, model: Any, hooks: list[str], runner: dict[str, Any], keep: int) -> None:
        from sae_lens.util import extract_stop_at_layer_from_tlens_hook_name

        self.model = model
        self.hooks = list(dict.fromkeys(hooks))
        layers = [extract_stop_at_layer_from_tlens_hook_name(hook) for hook in self.hooks]
        # The deepest hook decides; the layers before it compute exactly what they would alone.
        self.stop_at_layer = None if any(layer is None for layer in layers) else max(layers)
        self.model_kwargs: dict[str, Any] = runner.get("model_kwargs", {})
        self.autocast_lm = bool(runner.get("autocast_lm", False))
        self.keep = max(keep, 1)
        # Keyed by the batch's first row: the rows there, so their activations, never change.
        self._cache: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()  # one model pass at a time (prefetch threads)
        self.passes = 0  # model passes made (the benchmark and tests read it)

    @torch.no_grad()
    def activations(self, position: int, batch_tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every hook's activations for the token batch whose first row is ``position``."""
        with self._lock:
            found = self._cache.get(position)
            if found is not None:
                self._cache.move_to_end(position)
                return found
            with torch.autocast(
                device_type=torch.device(self.model.cfg.device).type, dtype=torch.bfloat16, enabled=self.autocast_lm
            ):
                _, cache = self.model.run_with_cache(
                    batch_tokens,
                    names_filter=self.hooks,
                    stop_at_layer=self.stop_at_layer,
                    prepend_bos=False,
                    **self.model_kwargs,
                )
            self.passes += 1
            found = {hook: cache[hook] for hook in self.hooks}
            self._cache[position] = found
            while len(self._cache) > self.keep:
                self._cache.popitem(last=False)
            return found


class GroupStream(ActivationStream):
    """An ``ActivationStream`` that shuffles with its own RNG state and reads a shared pass."""

    def __init__(
        self,
        model: Any,
        tokens: np.ndarray | TokenRows,
        runner: dict[str, Any],
        d_in: int,
        exclude_tokens: torch.Tensor | None,
        shared: SharedForward,
        rng_state: torch.Tensor,
    ) -> None:
        super().__init__(model, tokens, runner, d_in, exclude_tokens)
        self.shared = shared
        self.rng_state = rng_state

    def _refill(self) -> None:
        # The mixing shuffle draws from the global torch RNG, exactly as alone; only the
        # state it draws from is this stream's own.
        outside = torch.get_rng_state()
        torch.set_rng_state(self.rng_state)
        try:
            super()._refill()
            self.rng_state = torch.get_rng_state()
        finally:
            torch.set_rng_state(outside)

    def _model_pass(self, position: int, batch_tokens: torch.Tensor) -> torch.Tensor:
        # ActivationStream's, with the pass shared by the group (and its prefetch threads).
        return self.shared.activations(position, batch_tokens)[self.hook_name]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "rng": self.rng_state.clone()}

    def load_state_dict(self, state: dict[str, Any], device: torch.device | str) -> None:
        super().load_state_dict(state, device)
        self.rng_state = state["rng"].to(torch.uint8).cpu()
