"""`lenslab logs NAME` for a run the box does not have: one line on stderr and exit 1, never
Docker's own error printed as if it were the log; a run with only its log file prints that.

The box is this machine (provider local), with a run name no container has.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from lenslab_testkit import lenslab


def _config(project: Path, root: Path) -> None:
    (project / "lenslab.toml").write_text(f'[box]\nname = "here"\nprovider = "local"\nroot = "{root}"\n')


def test_a_run_with_no_container_and_no_log_is_one_line(project: Path, home: Path, tmp_path: Path) -> None:
    _config(project, tmp_path / "root")
    name = f"absent-{uuid.uuid4().hex[:8]}"
    result = lenslab("logs", name)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (
        f"lenslab: error: run {name} has no container and no log file on the box; see the runs with `lenslab runs`\n"
    )


def test_a_run_with_only_its_log_file_prints_it(project: Path, home: Path, tmp_path: Path) -> None:
    _config(project, tmp_path / "root")
    name = f"done-{uuid.uuid4().hex[:8]}"
    run_dir = tmp_path / "root" / "runs" / name
    run_dir.mkdir(parents=True)
    (run_dir / "train.log").write_text("step 1 loss 2.5\nstep 2 loss 2.1\n")
    result = lenslab("logs", name)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == "step 1 loss 2.5\nstep 2 loss 2.1\n"
