"""Data with a position that can be saved and restored in O(1).

SAELens streams its dataset and, on resume, re-reads it from the start up to the saved
position. lenslab instead tokenizes the dataset once into a fixed-width array of sequences
(``data/tokens-<key>.npy``, memory-mapped), so the position is one integer and resuming at
90 % costs the same as at 10 %. The sequences are made exactly as SAELens makes them
(``concat_and_batch_sequences``), and activations are mixed exactly as its ``mixing_buffer``
mixes them, but with the buffer held in an object whose contents are part of the
checkpoint: a resumed run is served the very same batches.

The array is written by a background thread (tokenfile.py) while training reads its first
rows. With ``prefetch_llm_batches`` the model's forward passes run ahead in another thread
(prefetch.py); while it is on, only that thread runs the model (TransformerLens's
``run_with_cache`` is not thread-safe; a group's streams take turns under one lock).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lenslab_workspace.train.atomic import write_json_atomic
from lenslab_workspace.train.dataset import ByteTokenizer, iterate_sequences, root_reason
from lenslab_workspace.train.errors import DataError
from lenslab_workspace.train.prefetch import POLL_SECONDS, Prefetcher
from lenslab_workspace.train.tokenfile import ArrayRows, TokenFile, TokenRows

# ByteTokenizer, iterate_sequences and root_reason live in dataset.py; the token array's
# readers import them from here too.
__all__ = [
    "ActivationStream",
    "ByteTokenizer",
    "content_hash",
    "dataset_key",
    "iterate_sequences",
    "materialize_tokens",
    "open_token_rows",
    "prefetch_depth",
    "root_reason",
    "sequences_needed",
]

log = logging.getLogger("lenslab.train")

HASHES_FILE = "dataset-hashes.json"
HASH_CHUNK_BYTES = 8 << 20


def dataset_key(
    runner: dict[str, Any], tokenizer_name: str, n_sequences: int, data_dir: Path, exclude: list[int] | None = None
) -> str:
    """What determines the token array; a change makes a new array instead of reusing one.

    A local dataset is known by its content (sha256), not its path or mtime: uploading the same
    file again, or to another place, finds the array tokenized before.
    """
    fingerprint: dict[str, Any] = {
        "chat": runner.get("use_chat_formatting", False),
        "context_size": runner.get("context_size", 128),
        "prepend_bos": runner.get("prepend_bos", True),
        "separator": runner.get("sequence_separator_token", "bos"),
        "no_concat": runner.get("disable_concat_sequences", False),
        "tokenizer": tokenizer_name,
        "n_sequences": n_sequences,
    }
    if exclude is not None:  # the array holds more rows: excluded positions do not count
        fingerprint["exclude"] = sorted(exclude)
        fingerprint["seqpos_slice"] = list(runner.get("seqpos_slice", (None,)))
    path = Path(runner["dataset_path"])
    if path.exists():
        fingerprint["content"] = content_hash(path, data_dir)
    else:
        fingerprint["dataset_path"] = runner["dataset_path"]
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def content_hash(path: Path, data_dir: Path) -> str:
    """sha256 of a dataset file (or of every file of a saved dataset directory).

    Hashes are cached in ``data/dataset-hashes.json`` by (path, size, mtime), so an unchanged
    file is not read again at each launch; a changed one (new size or mtime) is re-hashed.
    """
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    cache_file = data_dir / HASHES_FILE
    try:
        cache = json.loads(cache_file.read_text())
        cache = cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):
        cache = {}
    digest, changed = hashlib.sha256(), False
    for file in files:
        stat = file.stat()
        key = str(file.resolve())
        known = cache.get(key)
        stamp = [stat.st_size, stat.st_mtime_ns]
        if not (isinstance(known, dict) and known.get("stamp") == stamp and isinstance(known.get("sha256"), str)):
            known = {"stamp": stamp, "sha256": _sha256(file)}
            cache[key], changed = known, True
        digest.update(f"{file.relative_to(path) if path.is_dir() else ''}\0{known['sha256']}\0".encode())
    if changed:
        with contextlib.suppress(OSError):  # only a cache: a failed write costs a re-hash next time
            data_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(data_dir / HASHES_FILE, cache)
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def sequences_needed(runner: dict[str, Any], training_context_size: int) -> int:
    """Enough sequences for the whole run, so a streamed dataset is read once and no further.

    The stream reads the batches it trains on and those of the norm estimate, plus what its
    mixing buffer holds at the end: ``n_batches_in_buffer`` sequences' worth of positions
    (SAELens's buffer size is ``n_batches_in_buffer x training context``), plus at most one
    model batch and one training batch beyond.
    """
    context = max(training_context_size, 1)
    batch_size = runner.get("train_batch_size_tokens", 4096)
    tokens = runner.get("training_tokens", 2_000_000)
    tokens += runner.get("n_batches_for_norm_estimate", 1000) * batch_size
    buffer_sequences = runner.get("n_batches_in_buffer", 20)
    store_batch = runner.get("store_batch_size_prompts", 32)
    return int(math.ceil(tokens / context) + buffer_sequences + 2 * store_batch + math.ceil(batch_size / context))


def materialize_tokens(
    runner: dict[str, Any],
    model: Any,
    tokenizer: Any,
    data_dir: Path,
    tokenizer_name: str,
    limit: int,
    reuse_from: tuple[Path, ...] = (),
    exclude_tokens: torch.Tensor | None = None,
) -> np.ndarray:
    """The whole token array of ``open_token_rows``, memory-mapped, once it is complete."""
    rows = open_token_rows(runner, model, tokenizer, data_dir, tokenizer_name, limit, reuse_from, exclude_tokens)
    return rows.array if isinstance(rows, ArrayRows) else rows.wait_complete()


def open_token_rows(
    runner: dict[str, Any],
    model: Any,
    tokenizer: Any,
    data_dir: Path,
    tokenizer_name: str,
    limit: int,
    reuse_from: tuple[Path, ...] = (),
    exclude_tokens: torch.Tensor | None = None,
) -> ArrayRows | TokenFile:
    """``data/tokens-<key>.npy`` memory-mapped if it exists, else a ``TokenFile`` that makes it
    in the background (continuing a partial one an earlier launch left).

    ``limit`` sequences' worth of training positions are stored. With ``exclude_tokens`` the
    positions the stream drops do not count, so more rows are stored: SAELens reads new rows
    to replace dropped positions, and so must the stream, instead of wrapping to early rows.
    """
    exclude = None if exclude_tokens is None else [int(t) for t in exclude_tokens.tolist()]
    target = data_dir / f"tokens-{dataset_key(runner, tokenizer_name, limit, data_dir, exclude)}.npy"
    if target.exists():
        return ArrayRows(np.load(target, mmap_mode="r"))
    for other in reuse_from:
        if (other / target.name).is_file():  # --fresh: the set-aside run tokenized the same data
            data_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(other / target.name, target)
            log.info("reusing the tokenized dataset %s", target.name)
            return ArrayRows(np.load(target, mmap_mode="r"))
    context_size = runner.get("context_size", 128)
    positions = slice(*runner.get("seqpos_slice", (None,)))
    needed = limit * len(range(context_size)[positions])
    return TokenFile(runner, model, tokenizer, target, needed, exclude_tokens)


def prefetch_depth(runner: dict[str, Any]) -> int:
    """How many model batches the prefetch thread may run ahead: ``prefetch_llm_batches``
    (``true`` is 1, as in SAELens) times the model batches one mixing-buffer refill takes, so
    a whole refill's forward passes overlap the training steps before it. 0: no prefetch."""
    setting = runner.get("prefetch_llm_batches", False)
    size = (1 if setting else 0) if isinstance(setting, bool) else int(setting)
    if size <= 0:
        return 0
    context = len(range(runner.get("context_size", 128))[slice(*runner.get("seqpos_slice", (None,)))])
    kept = float(runner.get("activations_mixing_fraction", 0.5))
    refill = int(runner.get("n_batches_in_buffer", 20)) * context * (1 - kept)
    per_batch = max(1, int(runner.get("store_batch_size_prompts", 32)) * context)
    return size * max(1, math.ceil(refill / per_batch))


class ActivationStream:
    """Batches of activations for SAE training, with a state that checkpoints can hold.

    The state is the next sequence index, the epoch, and the contents of the mixing buffer
    (the kept activations and the not-yet-served batches). Restoring it, together with the
    torch RNG state, continues the exact sample stream of an uninterrupted run.
    """

    def __init__(
        self,
        model: Any,
        tokens: np.ndarray | TokenRows,
        runner: dict[str, Any],
        d_in: int,
        exclude_tokens: torch.Tensor | None,
    ) -> None:
        from sae_lens.util import extract_stop_at_layer_from_tlens_hook_name

        self.model = model
        self.tokens: TokenRows = ArrayRows(tokens) if isinstance(tokens, np.ndarray) else tokens
        self.hook_name: str = runner.get("hook_name", "blocks.0.hook_mlp_out")
        self.hook_head_index: int | None = runner.get("hook_head_index")
        self.seqpos_slice = slice(*runner.get("seqpos_slice", (None,)))
        self.model_kwargs: dict[str, Any] = runner.get("model_kwargs", {})
        self.store_batch_size = runner.get("store_batch_size_prompts", 32)
        self.batch_size = runner.get("train_batch_size_tokens", 4096)
        self.mix_fraction = runner.get("activations_mixing_fraction", 0.5)
        context_size = runner.get("context_size", 128)
        training_context_size = len(range(context_size)[self.seqpos_slice])
        self.buffer_size = runner.get("n_batches_in_buffer", 20) * training_context_size
        self.d_in = d_in
        self.exclude_tokens = exclude_tokens
        self.stop_at_layer = extract_stop_at_layer_from_tlens_hook_name(self.hook_name)
        self.autocast_lm = bool(runner.get("autocast_lm", False))
        # act_store_device as in SAELens: the SAE's device unless set; "with_model" is the model's.
        device = runner.get("device", "cpu")
        store = runner.get("act_store_device") or device
        self.store_device = torch.device(runner.get("llm_device") or device if store == "with_model" else store)
        if self.buffer_size < self.batch_size:
            # SAELens's mixing_buffer refuses this too; say which fields to change.
            raise DataError(
                f"n_batches_in_buffer x context ({self.buffer_size} tokens) is smaller than "
                f"train_batch_size_tokens ({self.batch_size}); raise n_batches_in_buffer"
            )
        # Waits for the first rows of a dataset still being tokenized (and for its errors).
        available = self.tokens.available(self.store_batch_size)
        if available is not None and available < self.store_batch_size:
            raise DataError(
                f"the dataset has {available} sequences, fewer than store_batch_size_prompts "
                f"({self.store_batch_size}); use more data or a smaller store_batch_size_prompts"
            )
        self.prefetch = prefetch_depth(runner)
        self._prefetcher: Prefetcher[tuple[int, int, torch.Tensor]] | None = None
        self.position = 0  # of the next model batch the mixing buffer takes (never one in flight)
        self.epoch = 0
        self._storage: torch.Tensor | None = None
        self._serving: torch.Tensor | None = None
        self._served = 0

    def __iter__(self) -> ActivationStream:
        return self

    def __next__(self) -> torch.Tensor:
        if self._serving is None or self._served * self.batch_size >= self._serving.shape[0]:
            self._refill()
        assert self._serving is not None
        start = self._served * self.batch_size
        self._served += 1
        return self._serving[start : start + self.batch_size]

    @torch.no_grad()
    def _refill(self) -> None:
        # Same arithmetic as sae_lens.training.mixing_buffer.mixing_buffer, one refill at a time.
        while True:
            new = self._llm_batch()
            self._storage = new if self._storage is None else torch.cat([self._storage, new], dim=0)
            if self._storage.shape[0] >= self.buffer_size:
                break
        if self.mix_fraction > 0:
            self._storage = self._storage[torch.randperm(self._storage.shape[0])]
        keep_for_mixing = int(self.buffer_size * self.mix_fraction)
        num_to_serve = self._storage.shape[0] - keep_for_mixing
        serving_cutoff = max(1, num_to_serve // self.batch_size) * self.batch_size
        self._serving = self._storage[:serving_cutoff]
        self._storage = self._storage[serving_cutoff:]
        self._served = 0

    def _llm_batch(self) -> torch.Tensor:
        """The next model batch's activations: made here, or taken from the prefetch thread."""
        if not self.prefetch:
            return self._activations(self._advance())
        if self._prefetcher is None:  # started lazily: a resume sets the position first
            cursor = [self.position, self.epoch]
            self._prefetcher = Prefetcher(lambda stop: self._produce(cursor, stop), self.prefetch, "lenslab-prefetch")
        position, epoch, activations = self._prefetcher.take()
        self._advance(position, epoch)
        return activations

    def _advance(self, position: int | None = None, epoch: int | None = None) -> int:
        """Move past the batch at ``position`` (found here unless the prefetch thread found it)."""
        if position is None or epoch is None:
            found = self._rows_at(self.position, self.epoch, None)
            assert found is not None  # no timeout: it waits for the rows
            position, epoch = found
        if epoch != self.epoch:
            log.warning("all sequences of the dataset have been used; beginning epoch %d", epoch)
        self.position, self.epoch = position + self.store_batch_size, epoch
        return position

    def _produce(self, cursor: list[int], stop: threading.Event) -> tuple[int, int, torch.Tensor] | None:
        """In the prefetch thread: the model batch at ``cursor``, which then moves on."""
        while (found := self._rows_at(cursor[0], cursor[1], POLL_SECONDS)) is None:
            if stop.is_set():
                return None
        position, epoch = found
        cursor[0], cursor[1] = position + self.store_batch_size, epoch
        return position, epoch, self._activations(position)

    def _rows_at(self, position: int, epoch: int, timeout: float | None) -> tuple[int, int] | None:
        """Where the batch from ``position`` really starts: past the last whole batch of the
        array, at its beginning, in the next epoch. ``None``: the rows are not tokenized yet."""
        available = self.tokens.available(position + self.store_batch_size, timeout)
        if available is None:
            return None
        if position + self.store_batch_size > available:
            return 0, epoch + 1
        return position, epoch

    @torch.no_grad()
    def _activations(self, position: int) -> torch.Tensor:
        """The hook's activations for the rows at ``position``: a function of them and the model only."""
        rows = self.tokens.read(position, self.store_batch_size)
        batch_tokens = torch.from_numpy(np.asarray(rows, dtype=np.int64)).to(self.model.cfg.device)
        acts = self._model_pass(position, batch_tokens)[:, self.seqpos_slice]
        if self.hook_head_index is not None:
            acts = acts[:, :, self.hook_head_index]
        acts = acts.reshape(acts.shape[0] * acts.shape[1], self.d_in).float().to(self.store_device)
        if self.exclude_tokens is not None:
            token_ids = batch_tokens[:, self.seqpos_slice].reshape(-1).to(acts.device)
            acts = acts[~torch.isin(token_ids, self.exclude_tokens.to(acts.device))]
        activations: torch.Tensor = acts
        return activations

    def _model_pass(self, position: int, batch_tokens: torch.Tensor) -> torch.Tensor:
        """The hook's activations (all positions) for ``batch_tokens``, the rows at ``position``."""
        with torch.autocast(
            device_type=torch.device(self.model.cfg.device).type, dtype=torch.bfloat16, enabled=self.autocast_lm
        ):
            _, cache = self.model.run_with_cache(
                batch_tokens,
                names_filter=[self.hook_name],
                stop_at_layer=self.stop_at_layer,
                prepend_bos=False,
                **self.model_kwargs,
            )
        hook_acts: torch.Tensor = cache[self.hook_name]
        return hook_acts

    def state_dict(self) -> dict[str, Any]:
        """A copy of the stream's state, detached from the live buffers."""
        remaining = None
        if self._serving is not None:
            remaining = self._serving[self._served * self.batch_size :].detach().to("cpu", copy=True)
        storage = None if self._storage is None else self._storage.detach().to("cpu", copy=True)
        return {"position": self.position, "epoch": self.epoch, "storage": storage, "serving": remaining}

    def load_state_dict(self, state: dict[str, Any], device: torch.device | str) -> None:
        self.close()  # batches prefetched from the old position are not the checkpoint's
        self.position = int(state["position"])
        self.epoch = int(state["epoch"])
        self._storage = None if state["storage"] is None else state["storage"].to(device)
        self._serving = None if state["serving"] is None else state["serving"].to(device)
        self._served = 0

    def close(self) -> None:
        """Stop the prefetch thread (if any); the next batch starts it again from ``position``."""
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None

    def finish(self) -> None:
        """At the end of a run: stop prefetching, and let the token array be completed (what is
        left is the margin of a few batches ``sequences_needed`` adds), so ``data/`` holds it whole
        for a later evaluation. A bad row in that margin, never read by training, is only logged."""
        self.close()
        if isinstance(self.tokens, TokenFile):
            try:
                self.tokens.wait_complete()
            except DataError as exc:
                log.warning("the token array was not completed: %s", exc)
