"""`lenslab eval`'s copy of eval/ when the box's listing fails or lies: one PullFailed line, and
nothing of the copy left on the laptop (not even the directories it made).

The box is this machine (LocalRunner), with a `find` earlier on PATH that fails part-way or
lists a size the file does not have, as a box with a failing disk or a changing file would.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lenslab.cli.eval import pull_eval
from lenslab.remote.bootstrap import LocalRunner
from lenslab.remote.pull import PullFailed


@pytest.fixture
def remote(tmp_path: Path) -> Path:
    directory = tmp_path / "box" / "runs" / "tiny" / "eval"
    directory.mkdir(parents=True)
    (directory / "report.html").write_text("<html>new</html>")
    (directory / "metrics.json").write_text("{}")
    return directory


def _fake_find(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, listing: str, status: int) -> None:
    directory = tmp_path / "bin"
    directory.mkdir()
    find = directory / "find"
    find.write_text(f"#!/bin/sh\nprintf '{listing}'\necho 'find: ./x: Input/output error' >&2\nexit {status}\n")
    find.chmod(0o755)
    monkeypatch.setenv("PATH", f"{directory}{os.pathsep}{os.environ['PATH']}")


def test_a_failing_find_is_one_line_and_copies_nothing(
    tmp_path: Path, remote: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_find(tmp_path, monkeypatch, "f 16 report.html\\0", 1)  # a partial listing, then a failure
    dest = tmp_path / "laptop" / "runs" / "tiny"
    with pytest.raises(PullFailed) as caught:
        pull_eval(LocalRunner(), str(remote), dest)
    assert str(caught.value) == f"cannot list {remote} on the box (exit 1); run `lenslab eval` again"
    assert not (tmp_path / "laptop").exists()


def test_a_failed_copy_removes_the_directories_it_made(
    tmp_path: Path, remote: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "laptop").mkdir()
    _fake_find(tmp_path, monkeypatch, "f 999 report.html\\0f 2 metrics.json\\0", 0)  # report.html has 16 bytes
    dest = tmp_path / "laptop" / "runs" / "tiny"
    with pytest.raises(PullFailed, match="got 16 bytes, the box listed 999"):
        pull_eval(LocalRunner(), str(remote), dest)
    assert list((tmp_path / "laptop").iterdir()) == []  # runs/tiny/eval.partial and runs/ are gone
