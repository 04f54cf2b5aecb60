"""Rows of the dataset as SAELens reads them, and the token sequences it makes of them.

The dataset is a local file or directory or a Hugging Face dataset; its columns decide text
vs tokens exactly as in SAELens 6.54's ``ActivationsStore``, and text is tokenized and
concatenated with SAELens's own ``concat_and_batch_sequences`` (and its chat template
helper for ``use_chat_formatting``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lenslab_workspace.train.errors import DataError

log = logging.getLogger("lenslab.train")

# The columns SAELens reads, in its order of preference; the first two hold token ids.
TOKEN_COLUMNS = ("tokens", "input_ids", "text", "problem")
TOKENIZED_COLUMNS = ("tokens", "input_ids")
CHAT_COLUMNS = ("conversation", "conversations", "messages", "text")
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}


class ByteTokenizer:
    """The tiny-random model's tokenizer: UTF-8 bytes, BOS is the last id of the vocabulary."""

    def __init__(self, d_vocab: int) -> None:
        self.bos_token_id = d_vocab - 1

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def root_reason(exc: BaseException) -> str:
    """The message of the exception at the bottom of ``exc``'s cause chain, on one line:
    datasets wraps the reason (e.g. pyarrow's "JSON parse error: ...") in a generic error.
    An implicit ``__context__`` is followed only past an empty message: after a message it
    is what failed while handling the reason (datasets' fallback parser), not the reason."""
    seen: set[int] = set()
    reason = " ".join(str(exc).split()) or type(exc).__name__
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = " ".join(str(current).split())
        if text:
            reason = text
        current = current.__cause__ or (None if text else current.__context__)
    return reason


def load_dataset(runner: dict[str, Any]) -> Any:
    """The dataset, from a local file or directory or a Hugging Face dataset name."""
    import datasets

    source = runner["dataset_path"]
    path = Path(source)
    try:
        if path.is_dir():
            dataset: Any = datasets.load_from_disk(str(path))
            if isinstance(dataset, datasets.DatasetDict):
                dataset = dataset["train"]
            return dataset
        if path.exists():
            if path.stat().st_size == 0:
                raise DataError(f"dataset_path {source}: the file is empty (0 bytes); point it at a file with rows")
            kind = LOCAL_FORMATS.get(path.suffix)
            if kind is None:
                raise DataError(
                    f"dataset_path {source}: unsupported file type {path.suffix!r}; "
                    f"use one of {', '.join(LOCAL_FORMATS)} or a saved dataset directory"
                )
            if kind == "arrow":
                return datasets.Dataset.from_file(str(path))
            return datasets.load_dataset(kind, data_files=str(path), split="train")
        return datasets.load_dataset(
            source,
            split="train",
            streaming=runner.get("streaming", True),
            trust_remote_code=runner.get("dataset_trust_remote_code", True),
        )
    except DataError:
        raise
    except Exception as exc:  # datasets raises many unrelated types for one cause: not loadable
        raise DataError(f"dataset_path {source}: cannot load it: {root_reason(exc)[:300]}") from exc


def choose_column(runner: dict[str, Any], columns: list[str]) -> tuple[str, bool]:
    """``(column, tokenized)`` as SAELens 6.54's ActivationsStore chooses them: the columns
    decide, not ``is_dataset_tokenized`` (SAELens reads that field only to refuse it together
    with ``use_chat_formatting``); a contradicting field is noted in the log."""
    source = runner["dataset_path"]
    chat = bool(runner.get("use_chat_formatting", False))
    candidates = CHAT_COLUMNS if chat else TOKEN_COLUMNS
    column = next((c for c in candidates if c in columns), None)
    if column is None:
        what = "conversation or text" if chat else "token or text"
        raise DataError(
            f"dataset_path {source}: no {what} column; expected one of {', '.join(candidates)}, "
            f"found {', '.join(columns) or 'none'}"
        )
    tokenized = column in TOKENIZED_COLUMNS
    stated = runner.get("is_dataset_tokenized")
    if stated is not None and stated != tokenized and not chat:
        log.warning(
            "is_dataset_tokenized = %s, but the dataset's column %r is %s; like SAELens, the column decides",
            str(stated).lower(),
            column,
            "tokens" if tokenized else "text",
        )
    if chat and column == "text":
        log.warning("use_chat_formatting: no conversation column; each 'text' row is one user message")
    return column, tokenized


def iterate_rows(runner: dict[str, Any]) -> tuple[bool, Iterator[Any]]:
    """Whether the rows are token ids, and the rows of the chosen column."""
    dataset = load_dataset(runner)
    columns = list(dataset.column_names or [])
    if not columns:  # a streamed dataset may not know its columns before its first row
        first = next(iter(dataset), None)
        columns = list(first.keys()) if isinstance(first, dict) else []
    column, tokenized = choose_column(runner, columns)
    return tokenized, (row[column] for row in dataset)


def iterate_sequences(runner: dict[str, Any], model: Any, tokenizer: Any) -> Iterator[torch.Tensor]:
    """Fixed-length token sequences, made the way SAELens's ActivationsStore makes them."""
    from sae_lens.pretokenize_runner import get_special_token_from_cfg
    from sae_lens.tokenization_and_batching import concat_and_batch_sequences

    context_size = runner.get("context_size", 128)
    source = runner["dataset_path"]
    tokenized, rows = iterate_rows(runner)
    if tokenized:
        for index, row in enumerate(rows):
            if not isinstance(row, list | tuple) or not all(type(t) is int for t in row):
                raise DataError(
                    f"dataset_path {source}: row {index} is {_kind(row)}, not a list of token ids; "
                    "fix the row, or store text in a 'text' column"
                )
            tokens = torch.as_tensor(row[:context_size], dtype=torch.long)
            if tokens.shape[0] < context_size:
                raise DataError(
                    f"dataset_path {runner['dataset_path']}: a pre-tokenized row has {tokens.shape[0]} tokens, "
                    f"fewer than context_size = {context_size}; lower context_size or re-tokenize"
                )
            yield tokens
        return

    bos = tokenizer.bos_token_id if tokenizer is not None else None
    separator_cfg = runner.get("sequence_separator_token", "bos")
    if isinstance(tokenizer, ByteTokenizer):
        separator = bos if separator_cfg in ("bos", "eos", "sep") else separator_cfg
    else:
        separator = get_special_token_from_cfg(separator_cfg, tokenizer) if tokenizer is not None else None
    yield from concat_and_batch_sequences(
        tokens_iterator=_tokenize(runner, rows, model, tokenizer),
        context_size=context_size,
        begin_batch_token_id=bos if runner.get("prepend_bos", True) else None,
        begin_sequence_token_id=None,
        sequence_separator_token_id=separator,
        disable_concat_sequences=runner.get("disable_concat_sequences", False),
    )


def _tokenize(runner: dict[str, Any], rows: Iterator[Any], model: Any, tokenizer: Any) -> Iterator[torch.Tensor]:
    """Text rows as token ids, as SAELens tokenizes them (a chat template when asked)."""
    source = runner["dataset_path"]
    chat = bool(runner.get("use_chat_formatting", False))
    if chat:
        from sae_lens.tokenization_and_batching import tokenize_with_chat_template
    for index, row in enumerate(rows):
        if chat:
            if not isinstance(row, str | list):
                raise DataError(f"dataset_path {source}: row {index} is {_kind(row)}, not a conversation or text")
            conversation = [{"role": "user", "content": row}] if isinstance(row, str) else row
            yield tokenize_with_chat_template(conversation, tokenizer).to(torch.long)
            continue
        if not isinstance(row, str):
            raise DataError(
                f"dataset_path {source}: row {index} is {_kind(row)}, not text; fix the row, or store "
                "token ids in a 'tokens' or 'input_ids' column"
            )
        if isinstance(tokenizer, ByteTokenizer):
            yield tokenizer.encode(row)
        else:
            yield model.to_tokens(row, truncate=False, move_to_device=False, prepend_bos=False).squeeze(0)


KINDS = {bool: "a boolean", int: "a number", float: "a number", str: "text", dict: "an object", list: "a list"}


def _kind(value: Any) -> str:
    return "empty (null)" if value is None else KINDS.get(type(value), f"a {type(value).__name__}")
