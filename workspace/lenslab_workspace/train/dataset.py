"""Rows of the dataset as SAELens reads them, and the token sequences it makes of them.

The dataset is a local file or directory or a Hugging Face dataset; its columns decide text
vs tokens exactly as in SAELens 6.54's ``ActivationsStore``, and text is tokenized and
concatenated with SAELens's own ``concat_and_batch_sequences`` (and its chat template
helper for ``use_chat_formatting``).

``resumable_sequences`` also says where it stands after each dataset row (rows read, and the
tokens already concatenated but not yet a whole sequence), so tokenizing can stop anywhere and
continue later from that point to the very same sequences.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
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
            # A local file is streamed only when the run file asks: it is then read as it is
            # tokenized, instead of being converted to Arrow as a whole first.
            streamed = runner.get("streaming") is True
            return datasets.load_dataset(kind, data_files=str(path), split="train", streaming=streamed)
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


def iterate_rows(runner: dict[str, Any], skip: int = 0) -> tuple[bool, Iterator[Any]]:
    """Whether the rows are token ids, and the rows of the chosen column from row ``skip`` on."""
    dataset = load_dataset(runner)
    columns = list(dataset.column_names or [])
    if not columns:  # a streamed dataset may not know its columns before its first row
        first = next(iter(dataset), None)
        columns = list(first.keys()) if isinstance(first, dict) else []
    column, tokenized = choose_column(runner, columns)
    if skip:  # rows tokenized by an earlier launch: read past, not tokenized again
        dataset = dataset.skip(skip)
    return tokenized, (row[column] for row in dataset)


@dataclass(frozen=True)
class Boundary:
    """Where the sequences stand after a whole dataset row: enough to continue from there."""

    rows: int  # dataset rows read
    carry: torch.Tensor | None  # tokens concatenated since the last whole sequence


def iterate_sequences(runner: dict[str, Any], model: Any, tokenizer: Any) -> Iterator[torch.Tensor]:
    """Fixed-length token sequences, made the way SAELens's ActivationsStore makes them."""
    for item in resumable_sequences(runner, model, tokenizer):
        if isinstance(item, torch.Tensor):
            yield item


def resumable_sequences(
    runner: dict[str, Any], model: Any, tokenizer: Any, start: Boundary | None = None
) -> Iterator[torch.Tensor | Boundary]:
    """The sequences of ``iterate_sequences``, each dataset row followed by its ``Boundary``;
    from ``start`` (a boundary seen before) the sequences after it, the same as before."""
    from sae_lens.pretokenize_runner import get_special_token_from_cfg

    context_size = runner.get("context_size", 128)
    first = start.rows if start is not None else 0
    tokenized, rows = iterate_rows(runner, skip=first)
    if tokenized:
        for index, row in enumerate(rows, start=first):
            yield _token_row(runner, index, row, context_size)
            yield Boundary(index + 1, None)
        return
    bos = tokenizer.bos_token_id if tokenizer is not None else None
    separator_cfg = runner.get("sequence_separator_token", "bos")
    if isinstance(tokenizer, ByteTokenizer):
        separator = bos if separator_cfg in ("bos", "eos", "sep") else separator_cfg
    else:
        separator = get_special_token_from_cfg(separator_cfg, tokenizer) if tokenizer is not None else None
    yield from _concatenate(
        _tokenize(runner, rows, model, tokenizer, first),
        context_size,
        bos if runner.get("prepend_bos", True) else None,
        separator,
        bool(runner.get("disable_concat_sequences", False)),
        start,
    )


def _token_row(runner: dict[str, Any], index: int, row: Any, context_size: int) -> torch.Tensor:
    source = runner["dataset_path"]
    if not isinstance(row, list | tuple) or not all(type(t) is int for t in row):
        raise DataError(
            f"dataset_path {source}: row {index} is {_kind(row)}, not a list of token ids; "
            "fix the row, or store text in a 'text' column"
        )
    tokens = torch.as_tensor(row[:context_size], dtype=torch.long)
    if tokens.shape[0] < context_size:
        raise DataError(
            f"dataset_path {source}: a pre-tokenized row has {tokens.shape[0]} tokens, "
            f"fewer than context_size = {context_size}; lower context_size or re-tokenize"
        )
    return tokens


def _concatenate(
    token_rows: Iterator[torch.Tensor],
    context_size: int,
    bos: int | None,
    separator: int | None,
    no_concat: bool,
    start: Boundary | None,
) -> Iterator[torch.Tensor | Boundary]:
    """SAELens's ``concat_and_batch_sequences``, one dataset row at a time, with its state (the
    partial sequence) yielded after each row. Without concatenation rows are independent, so
    SAELens's function itself runs on each; with it, its own step ``_add_tokens_to_batch``."""
    from sae_lens.tokenization_and_batching import _add_tokens_to_batch, concat_and_batch_sequences

    rows = start.rows if start is not None else 0
    batch = start.carry if start is not None else None
    for tokens in token_rows:
        rows += 1
        if no_concat:
            yield from concat_and_batch_sequences(
                iter([tokens]), context_size, bos, None, separator, disable_concat_sequences=True
            )
            yield Boundary(rows, None)
            continue
        offset, is_start = 0, True
        while tokens.shape[0] - offset > 0:
            batch, offset, is_start = _add_tokens_to_batch(
                batch=batch,
                tokens=tokens,
                offset=offset,
                context_size=context_size,
                is_start_of_sequence=is_start,
                begin_batch_token_id=bos,
                begin_sequence_token_id=None,
                sequence_separator_token_id=separator,
            )
            if batch.shape[0] == context_size:
                yield batch
                batch = None
        yield Boundary(rows, batch)


def _tokenize(
    runner: dict[str, Any], rows: Iterator[Any], model: Any, tokenizer: Any, first: int = 0
) -> Iterator[torch.Tensor]:
    """Text rows as token ids, as SAELens tokenizes them (a chat template when asked)."""
    source = runner["dataset_path"]
    chat = bool(runner.get("use_chat_formatting", False))
    if chat:
        from sae_lens.tokenization_and_batching import tokenize_with_chat_template
    for index, row in enumerate(rows, start=first):
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


def build_exclude_tokens(fields: dict[str, Any], tokenizer: Any) -> torch.Tensor | None:
    """``exclude_special_tokens`` as the token ids the stream drops (true: the tokenizer's special ones)."""
    setting = fields.get("exclude_special_tokens", False)
    if setting is False:
        return None
    if setting is True:
        if tokenizer is None:
            return None
        if isinstance(tokenizer, ByteTokenizer):
            return torch.tensor([tokenizer.bos_token_id])
        from sae_lens.util import get_special_token_ids

        return torch.tensor(get_special_token_ids(tokenizer))
    return torch.tensor(list(setting))
