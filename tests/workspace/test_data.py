"""Datasets from local files, text or pre-tokenized, made into fixed-length rows once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lenslab_workspace.train.data import ByteTokenizer, materialize_tokens
from lenslab_workspace.train.errors import DataError


def runner(path: Path, **extra: Any) -> dict[str, Any]:
    return {"dataset_path": str(path), "context_size": 8, "is_dataset_tokenized": True, **extra}


def token_rows(n: int, length: int = 10) -> list[list[int]]:
    return [[(i * 7 + j) % 50 for j in range(length)] for i in range(n)]


def write_parquet(path: Path, rows: list[list[int]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"input_ids": rows}), path)


def write_arrow(path: Path, rows: list[list[int]]) -> None:
    import datasets

    datasets.Dataset.from_dict({"tokens": rows}).save_to_disk(str(path))


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "saved-dataset"])
def test_pretokenized_local_files(tmp_path: Path, kind: str) -> None:
    rows = token_rows(20)
    if kind == "jsonl":
        path = tmp_path / "toks.jsonl"
        path.write_text("\n".join(json.dumps({"tokens": r}) for r in rows))
    elif kind == "parquet":
        path = tmp_path / "toks.parquet"
        write_parquet(path, rows)
    else:
        path = tmp_path / "toks"
        write_arrow(path, rows)
    array = materialize_tokens(runner(path), None, None, tmp_path / "data", "t", limit=1000)
    assert array.shape == (20, 8)
    assert np.array_equal(array, np.array(rows)[:, :8])
    # Made once: a second call maps the same file instead of reading the dataset again.
    cached = list((tmp_path / "data").glob("tokens-*.npy"))
    assert len(cached) == 1
    again = materialize_tokens(runner(path), None, None, tmp_path / "data", "t", limit=1000)
    assert isinstance(again, np.memmap) and np.array_equal(again, array)


def test_text_is_concatenated_with_bos_like_saelens(tmp_path: Path) -> None:
    path = tmp_path / "text.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in ["abcdefghij", "klmnop", "qrstuvwxyz"]))
    tokenizer = ByteTokenizer(257)
    array = materialize_tokens(runner(path, is_dataset_tokenized=False), None, tokenizer, tmp_path, "bytes", 100)
    bos = 256
    first = [bos, *b"abcdefg"]
    assert array[0].tolist() == first
    # Every row starts with BOS; sequences are joined with the separator (BOS by default).
    assert all(row[0] == bos for row in array.tolist())
    assert bos in array[1].tolist()[1:]


def test_limit_stops_reading(tmp_path: Path) -> None:
    path = tmp_path / "toks.parquet"
    write_parquet(path, token_rows(100))
    assert materialize_tokens(runner(path), None, None, tmp_path, "t", limit=30).shape == (30, 8)


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (
            lambda p: p.write_text(json.dumps({"words": "x"})),
            "no token or text column; expected one of tokens, input_ids, text, problem, found words",
        ),
        (
            lambda p: p.write_text(json.dumps({"tokens": [1, 2, 3]})),
            "a pre-tokenized row has 3 tokens, fewer than context_size = 8; lower context_size or re-tokenize",
        ),
    ],
)
def test_bad_datasets(tmp_path: Path, make: Any, expected: str) -> None:
    path = tmp_path / "bad.jsonl"
    make(path)
    with pytest.raises(DataError) as info:
        materialize_tokens(runner(path), None, None, tmp_path, "t", 10)
    assert str(info.value) == f"dataset_path {path}: {expected}"
    assert not list(tmp_path.glob("tokens-*"))


def test_unsupported_file_type(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("a,b\n")
    with pytest.raises(DataError) as info:
        materialize_tokens(runner(path), None, None, tmp_path, "t", 10)
    assert str(info.value) == (
        f"dataset_path {path}: unsupported file type '.csv'; use one of .jsonl, .json, .parquet, .arrow "
        "or a saved dataset directory"
    )


def test_token_array_is_keyed_by_content_not_path_or_mtime(tmp_path: Path) -> None:
    """A re-uploaded dataset (new mtime, or another path) finds the array tokenized before;
    only a change of content tokenizes again."""
    import os

    rows = token_rows(20)
    first = tmp_path / "a" / "toks.jsonl"
    first.parent.mkdir()
    first.write_text("\n".join(json.dumps({"tokens": r}) for r in rows))
    data = tmp_path / "data"
    materialize_tokens(runner(first), None, None, data, "t", limit=1000)
    made = sorted(p.name for p in data.glob("tokens-*.npy"))
    assert len(made) == 1

    os.utime(first, (1_000_000, 1_000_000))  # an upload that changed only the mtime
    second = tmp_path / "b" / "toks.jsonl"  # and an upload to another place
    second.parent.mkdir()
    second.write_bytes(first.read_bytes())
    for path in (first, second):
        (data / made[0]).touch()
        materialize_tokens(runner(path), None, None, data, "t", limit=1000)
        assert sorted(p.name for p in data.glob("tokens-*.npy")) == made

    second.write_text("\n".join(json.dumps({"tokens": r}) for r in token_rows(21)))
    materialize_tokens(runner(second), None, None, data, "t", limit=1000)
    assert len(list(data.glob("tokens-*.npy"))) == 2
    # Hashes are remembered by (size, mtime): an unchanged file is not read again.
    cache = json.loads((data / "dataset-hashes.json").read_text())
    assert {str(first.resolve()), str(second.resolve())} <= cache.keys()


def test_content_hash_is_not_recomputed_for_an_unchanged_file(tmp_path: Path) -> None:
    from lenslab_workspace.train.data import content_hash

    path = tmp_path / "toks.jsonl"
    path.write_text("x" * 100)
    data = tmp_path / "data"
    real = content_hash(path, data)
    # Poison the cache entry: a cached hash for the same (size, mtime) is believed, so reading
    # it back proves the file was not hashed again.
    cache = json.loads((data / "dataset-hashes.json").read_text())
    cache[str(path.resolve())]["sha256"] = "0" * 64
    (data / "dataset-hashes.json").write_text(json.dumps(cache))
    assert content_hash(path, data) != real
    path.write_text("y" * 101)  # new size: hashed again
    assert content_hash(path, data) == content_hash(path, tmp_path / "no-cache")
