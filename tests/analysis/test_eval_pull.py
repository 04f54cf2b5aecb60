"""`lenslab eval`'s copy of eval/ from the box: only a flat directory of plain files comes back.

The box is this machine (lenslab's LocalRunner runs the same listing and copy commands an SSH
link runs), with real files, links and odd names in the "box's" eval/.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from lenslab.cli.eval import pull_eval
from lenslab.remote.bootstrap import LocalRunner
from lenslab.remote.pull import PullFailed


def box_eval(tmp_path: Path) -> Path:
    remote = tmp_path / "box" / "runs" / "tiny" / "eval"
    remote.mkdir(parents=True)
    (remote / "report.html").write_text("<html>new</html>")
    (remote / "metrics.json").write_text('{"metrics": {}}')
    (remote / "l0.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(2000))
    return remote


def earlier_copy(tmp_path: Path) -> Path:
    dest = tmp_path / "laptop" / "runs" / "tiny"
    (dest / "eval").mkdir(parents=True)
    (dest / "eval" / "report.html").write_text("<html>old</html>")
    return dest


def test_eval_dir_is_copied_whole_and_replaces_the_earlier_copy(tmp_path: Path) -> None:
    remote, dest = box_eval(tmp_path), earlier_copy(tmp_path)
    local = pull_eval(LocalRunner(), str(remote), dest)
    assert local == (dest / "eval").resolve()
    assert sorted(p.name for p in local.iterdir()) == ["l0.png", "metrics.json", "report.html"]
    for name in ("l0.png", "metrics.json", "report.html"):
        assert (local / name).read_bytes() == (remote / name).read_bytes()
    assert not list(dest.glob("eval.*"))  # no .partial or .old left behind


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda d: (d / "link.json").symlink_to("/etc/passwd"), "not a regular file"),
        (lambda d: (d / "sub").mkdir(), "not a regular file"),
        (lambda d: (d / "two words.png").write_text("x"), "not a simple file name"),
        (lambda d: (d / ".hidden").write_text("x"), "not a simple file name"),
        (lambda d: (d / "line\nbreak").write_text("x"), "not a simple file name"),
        (lambda d: (d / "report.html").unlink(), "no report.html"),
    ],
)
def test_odd_entries_refuse_the_copy_and_keep_the_earlier_one(
    tmp_path: Path, make: Callable[[Path], object], words: str
) -> None:
    remote, dest = box_eval(tmp_path), earlier_copy(tmp_path)
    make(remote)
    with pytest.raises(PullFailed, match=words):
        pull_eval(LocalRunner(), str(remote), dest)
    assert (dest / "eval" / "report.html").read_text() == "<html>old</html>"
    assert sorted(p.name for p in dest.iterdir()) == ["eval"]


def test_missing_eval_dir_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PullFailed, match=r"no .* on the box"):
        pull_eval(LocalRunner(), str(tmp_path / "nowhere" / "eval"), tmp_path / "laptop")
    assert not (tmp_path / "laptop").exists()
