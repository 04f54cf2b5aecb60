"""A full disk while writing a checkpoint: a clear error, and the previous checkpoint survives."""

from __future__ import annotations

import errno
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lenslab_workspace.train.checkpoint import step_dirs, verify

from .conftest import (
    assert_bit_identical,
    final_weights,
    run_train,
    start_train,
    wait_for,
    write_run_file,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 16 MiB filesystem (tmpfs), so ENOSPC comes from the kernel."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount_point)], check=True)
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=True)


def fill(disk: Path) -> Path:
    filler = disk / "filler"
    with open(filler, "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * (64 << 10))
                handle.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def test_disk_full_during_checkpoint(tmp_path: Path, small_disk: Path, reference_run: dict[str, Any]) -> None:
    run_file = write_run_file(tmp_path / "run.toml")
    runs, run_dir = small_disk / "runs", small_disk / "runs" / "t"
    proc = start_train(run_file, runs)
    wait_for(lambda: len(step_dirs(run_dir / "checkpoints")) >= 1, what="a first checkpoint")
    filler = fill(small_disk)
    proc.wait(timeout=120)
    output = proc.stdout.read() if proc.stdout else ""

    assert proc.returncode == 1, output
    last_line = output.strip().splitlines()[-1]
    assert last_line.startswith("lenslab-train: error: disk full while writing checkpoint step-")
    assert last_line.endswith(
        f"in {run_dir / 'checkpoints'}: free space there (or lower resilience.keep_last) and run the same "
        "command again; earlier checkpoints are intact"
    )
    assert "Traceback" not in output
    survivors = step_dirs(run_dir / "checkpoints")
    assert survivors
    for path in survivors:
        verify(path)
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp-")]

    filler.unlink()
    result = run_train(run_file, runs)
    assert result.returncode == 0, result.stderr
    assert f"resuming from {survivors[0].name}" in result.stderr
    assert_bit_identical(final_weights(run_dir), reference_run)
