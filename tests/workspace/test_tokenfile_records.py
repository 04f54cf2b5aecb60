"""A hostile ``.progress.json`` never crashes tokenizing nor makes wrong rows: an unsound
record is discarded and the dataset tokenized from the start, to the rows of one clean pass."""

from __future__ import annotations

import json
import logging
import os
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lenslab_workspace.train.dataset import Boundary, ByteTokenizer, resumable_sequences
from lenslab_workspace.train.tokenfile import DTYPE, PROGRESS_VERSION, TokenFile, npy_header, record_digest

from .conftest import CORPUS

TOKENIZER = ByteTokenizer(257)
COLUMNS = 32
LIMIT = 3000  # sequences the array holds
KEPT_ROWS = 700  # sequences a killed launch had committed (about; the next whole dataset row)


def runner(path: Path) -> dict[str, object]:
    return {"dataset_path": str(path), "context_size": COLUMNS, "streaming": True}


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, dict[str, Any]]:
    """The corpus, the array of one clean pass, and the sound record of a launch killed after
    ``KEPT_ROWS`` sequences, at a dataset row that leaves a partial sequence (a carry)."""
    path = tmp_path_factory.mktemp("corpus") / "c.jsonl"
    path.write_text(CORPUS.read_text())
    sequences: list[np.ndarray] = []
    boundary: Boundary | None = None
    for item in resumable_sequences(runner(path), None, TOKENIZER):
        if isinstance(item, torch.Tensor):
            sequences.append(item.to(torch.int32).numpy())
        elif boundary is None and len(sequences) >= KEPT_ROWS and item.carry is not None:
            boundary, rows = item, len(sequences)
        if len(sequences) == LIMIT:
            break
    assert boundary is not None and len(sequences) == LIMIT, "the corpus is too small for the test"
    reference = np.stack(sequences).astype(DTYPE)
    record: dict[str, Any] = {
        "version": PROGRESS_VERSION,
        "columns": COLUMNS,
        "rows": rows,
        "dataset_rows": boundary.rows,
        "carry": [int(t) for t in boundary.carry.tolist()],  # type: ignore[union-attr]
        "kept": rows * COLUMNS,
        "last_row": zlib.crc32(reference[rows - 1].tobytes()),
    }
    return path, reference, {**record, "digest": record_digest(record)}


def tokenize_after(tmp_path: Path, corpus: Path, committed: np.ndarray, progress: str | bytes) -> np.ndarray:
    """The array a launch makes that finds a killed launch's partial file (the ``committed``
    rows, then rows written after the record was) and ``progress`` as the record."""
    target = tmp_path / "data" / "tokens-k.npy"
    target.parent.mkdir()
    uncommitted = np.full((40, COLUMNS), 7, dtype=DTYPE)
    target.with_name(f".{target.name}.partial").write_bytes(
        npy_header(0, COLUMNS) + committed.tobytes() + uncommitted.tobytes()
    )
    text = progress.encode() if isinstance(progress, str) else progress
    target.with_name(f".{target.stem}.progress.json").write_bytes(text)
    return TokenFile(runner(corpus), None, TOKENIZER, target, LIMIT * COLUMNS, None).wait_complete()


def signed(change: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], str]:
    """A change after which the digest is made to match: only the other checks can refuse it."""

    def make(record: dict[str, Any]) -> str:
        record = dict(record)
        change(record)
        return json.dumps({**record, "digest": record_digest(record)})

    return make


def unsigned(change: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], str]:
    """A plausible edit of a field, the digest left as it was."""

    def make(record: dict[str, Any]) -> str:
        record = dict(record)
        change(record)
        return json.dumps(record)

    return make


def raw(text: str | bytes) -> Callable[[dict[str, Any]], str | bytes]:
    return lambda record: text


def version_1(record: dict[str, Any]) -> str:
    """What the previous format wrote: no digest, no last row's CRC."""
    old = {k: v for k, v in record.items() if k not in ("digest", "last_row")}
    return json.dumps({**old, "version": 1})


HOSTILE: dict[str, Callable[[dict[str, Any]], str | bytes]] = {
    "negative-rows": signed(lambda r: r.update(rows=-1, kept=-COLUMNS)),
    "rows-beyond-file": signed(lambda r: r.update(rows=r["rows"] + 10_000, kept=(r["rows"] + 10_000) * COLUMNS)),
    "rows-huge": signed(lambda r: r.update(rows=10**30, kept=10**30 * COLUMNS)),
    "rows-float": signed(lambda r: r.update(rows=float(r["rows"]))),
    "rows-text": signed(lambda r: r.update(rows=str(r["rows"]))),
    "rows-bool": signed(lambda r: r.update(rows=True, kept=COLUMNS)),
    "rows-fewer-than-file": signed(lambda r: r.update(rows=r["rows"] - 1, kept=(r["rows"] - 1) * COLUMNS)),
    "dataset-rows-negative": signed(lambda r: r.update(dataset_rows=-5)),
    "dataset-rows-null": signed(lambda r: r.update(dataset_rows=None)),
    "sequences-from-no-rows": signed(lambda r: r.update(dataset_rows=0)),
    "kept-wrong": signed(lambda r: r.update(kept=r["kept"] - 1)),
    "last-row-wrong": signed(lambda r: r.update(last_row=r["last_row"] ^ 1)),
    "carry-not-integers": signed(lambda r: r.update(carry=[256, "a", None])),
    "carry-floats": signed(lambda r: r.update(carry=[float(t) for t in r["carry"]])),
    "carry-out-of-vocabulary": signed(lambda r: r.update(carry=[256, 70_000])),
    "carry-negative-id": signed(lambda r: r.update(carry=[256, -3])),
    "carry-too-long": signed(lambda r: r.update(carry=[256] + [65] * COLUMNS)),
    "carry-whole-sequence": signed(lambda r: r.update(carry=[256] + [65] * (COLUMNS - 1))),
    "carry-empty": signed(lambda r: r.update(carry=[])),
    "carry-without-bos": signed(lambda r: r.update(carry=[65, *r["carry"][1:]])),
    "carry-object": signed(lambda r: r.update(carry={"0": 256})),
    "carry-text": signed(lambda r: r.update(carry="256")),
    "columns-other": signed(lambda r: r.update(columns=COLUMNS * 2)),
    "version-other": signed(lambda r: r.update(version=PROGRESS_VERSION + 1)),
    "field-missing": signed(lambda r: r.pop("kept")),
    "field-extra": signed(lambda r: r.update(extra=1)),
    "dataset-rows-edited": unsigned(lambda r: r.update(dataset_rows=r["dataset_rows"] - 1)),
    "carry-edited": unsigned(lambda r: r.update(carry=[*r["carry"][:-1], 65])),
    "digest-not-text": unsigned(lambda r: r.update(digest=1)),
    "version-1": version_1,
    "not-json": raw("{"),
    "empty": raw(""),
    "a-list": raw("[1, 2, 3]"),
    "a-number": raw("7"),
    "nested-deep": raw("[" * 200_000 + "]" * 200_000),
    "infinite": raw('{"rows": 1e400}'),
    "nan": raw('{"rows": NaN}'),
    "too-large": raw(json.dumps({"pad": "x" * (2 << 20)})),
    "not-utf8": raw(b'{"rows": \xff\xfe}'),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_unsound_record_is_discarded_and_rows_are_a_clean_pass(
    name: str, tmp_path: Path, clean: tuple[Path, np.ndarray, dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    corpus, reference, record = clean
    progress = HOSTILE[name](record)
    with caplog.at_level(logging.INFO, logger="lenslab.train"):
        whole = tokenize_after(tmp_path, corpus, reference[: record["rows"]], progress)
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "continuing to tokenize" in m], messages
    assert [m for m in messages if "tokenizing the dataset from the start: the progress record" in m], messages
    assert whole.dtype == reference.dtype and np.array_equal(whole, reference)


def test_sound_record_is_continued_to_the_same_rows(
    tmp_path: Path, clean: tuple[Path, np.ndarray, dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    """The control: the checks accept what a killed launch really wrote, and only the rows
    written after its record (here 40 of garbage) are made again."""
    corpus, reference, record = clean
    with caplog.at_level(logging.INFO, logger="lenslab.train"):
        whole = tokenize_after(tmp_path, corpus, reference[: record["rows"]], json.dumps(record))
    messages = [r.getMessage() for r in caplog.records]
    assert [m for m in messages if f"continuing to tokenize the dataset after {record['rows']} sequences" in m]
    assert not [m for m in messages if "from the start" in m], messages
    assert np.array_equal(whole, reference)


def test_a_fifo_in_place_of_the_record_is_not_waited_on(
    tmp_path: Path, clean: tuple[Path, np.ndarray, dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    corpus, reference, _ = clean
    target = tmp_path / "data" / "tokens-k.npy"
    target.parent.mkdir()
    target.with_name(f".{target.name}.partial").write_bytes(npy_header(0, COLUMNS) + reference[:700].tobytes())
    os.mkfifo(target.with_name(f".{target.stem}.progress.json"))  # opening it to read would block
    with caplog.at_level(logging.INFO, logger="lenslab.train"):
        whole = TokenFile(runner(corpus), None, TOKENIZER, target, LIMIT * COLUMNS, None).wait_complete()
    assert [r for r in caplog.records if "not a regular file" in r.getMessage()]
    assert np.array_equal(whole, reference)
