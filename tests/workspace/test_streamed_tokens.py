"""The token array made in the background: the same rows as SAELens's batching, in the same
order, continued after a SIGKILL from where the killed launch had got to."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lenslab_workspace.train.data import materialize_tokens, open_token_rows
from lenslab_workspace.train.dataset import Boundary, ByteTokenizer, resumable_sequences
from lenslab_workspace.train.tokenfile import ArrayRows, TokenFile

from .conftest import CORPUS, wait_for

TOKENIZER = ByteTokenizer(257)


def corpus(path: Path, copies: int) -> Path:
    path.write_text(CORPUS.read_text() * copies)
    return path


def runner(path: Path, **extra: object) -> dict[str, object]:
    return {"dataset_path": str(path), "context_size": 32, "streaming": True, **extra}


@pytest.mark.parametrize("extra", [{}, {"disable_concat_sequences": True}, {"prepend_bos": False}])
def test_sequences_are_saelens_and_continue_from_any_row(tmp_path: Path, extra: dict[str, object]) -> None:
    from sae_lens.tokenization_and_batching import concat_and_batch_sequences

    path = tmp_path / "c.jsonl"
    path.write_text("".join(CORPUS.read_text().splitlines(keepends=True)[:300]))
    fields = runner(path, **extra)
    texts = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    expected = concat_and_batch_sequences(
        (TOKENIZER.encode(t) for t in texts),
        32,
        begin_batch_token_id=None if extra.get("prepend_bos") is False else 256,
        sequence_separator_token_id=256,
        disable_concat_sequences=bool(extra.get("disable_concat_sequences", False)),
    )
    items = list(resumable_sequences(fields, None, TOKENIZER))
    sequences = [item for item in items if isinstance(item, torch.Tensor)]
    assert [s.tolist() for s in sequences] == [s.tolist() for s in expected]
    # From any boundary, the sequences after it are the ones a run in one go made.
    for index in (5, 101, len(items) - 30):
        while not isinstance(items[index], Boundary):
            index += 1
        boundary = items[index]
        assert isinstance(boundary, Boundary)
        tail = [i for i in items[index + 1 :] if isinstance(i, torch.Tensor)]
        again = [i for i in resumable_sequences(fields, None, TOKENIZER, boundary) if isinstance(i, torch.Tensor)]
        assert [s.tolist() for s in again] == [s.tolist() for s in tail]


def test_background_array_equals_one_made_in_one_go_and_is_reused(tmp_path: Path) -> None:
    path = corpus(tmp_path / "c.jsonl", 2)
    fields = runner(path)
    rows = open_token_rows(fields, None, TOKENIZER, tmp_path / "bg", "bytes", limit=20_000)
    assert isinstance(rows, TokenFile)
    first = rows.read(0, 16).copy() if rows.available(16) else None  # readable before the end
    whole = rows.wait_complete()
    assert first is not None and np.array_equal(first, whole[:16])
    reference = materialize_tokens({**fields, "streaming": False}, None, TOKENIZER, tmp_path / "one", "bytes", 20_000)
    assert whole.dtype == reference.dtype and np.array_equal(whole, reference)
    assert isinstance(open_token_rows(fields, None, TOKENIZER, tmp_path / "bg", "bytes", limit=20_000), ArrayRows)
    assert [p.name for p in (tmp_path / "bg").iterdir() if p.name.startswith(".tokens")] == []


def test_empty_dataset_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    from lenslab_workspace.train.errors import DataError

    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "hi"}\n')
    with pytest.raises(DataError, match="empty: it yields no complete sequence"):
        materialize_tokens(runner(path), None, TOKENIZER, tmp_path / "data", "bytes", limit=10)
    assert [p.name for p in (tmp_path / "data").iterdir() if "tokens" in p.name] == []


WRITER = """
import sys, time
from pathlib import Path
from lenslab_workspace.train.data import open_token_rows
from lenslab_workspace.train.dataset import ByteTokenizer
rows = open_token_rows({"dataset_path": sys.argv[1], "context_size": 32, "streaming": True}, None,
                       ByteTokenizer(257), Path(sys.argv[2]), "bytes", limit=int(sys.argv[3]))
rows.wait_complete()
"""


@pytest.mark.slow
def test_sigkilled_tokenizing_continues_where_it_stopped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = corpus(tmp_path / "c.jsonl", 8)
    data, limit = tmp_path / "data", 90_000
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(data), str(limit)])
    try:

        def committed() -> bool:
            progress = list(data.glob(".tokens-*.progress.json"))
            return bool(progress) and json.loads(progress[0].read_text())["rows"] >= 20_000

        wait_for(committed, timeout=120, what="20000 committed rows")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert not list(data.glob("tokens-*.npy")), "tokenizing finished before the kill: use more data"
    with caplog.at_level("INFO", logger="lenslab.train"):
        rows = open_token_rows(runner(path), None, TOKENIZER, data, "bytes", limit=limit)
        assert isinstance(rows, TokenFile)
        assert rows.available(20_000, timeout=0) is not None  # the kept rows are there at once
        whole = rows.wait_complete()
    continued = [r.getMessage() for r in caplog.records if "continuing to tokenize" in r.getMessage()]
    assert len(continued) == 1 and int(continued[0].split("after ")[1].split(" ")[0]) >= 20_000
    reference = materialize_tokens(runner(path), None, TOKENIZER, tmp_path / "one", "bytes", limit)
    assert np.array_equal(whole, reference)
