"""A group of 4 SAEs over 2 hooks killed with SIGKILL at random points resumes bit-exactly."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from .conftest import assert_bit_identical, kill, run_train, start_train, wait_for_step
from .test_group import GROUP_SAES, group_run, weights

pytestmark = pytest.mark.slow

LONGER: dict[str, Any] = {"training_tokens": 61_440}  # 60 steps, a checkpoint every 10


def finals(run_dir: Path) -> dict[str, dict[str, object]]:
    return {entry["name"]: weights(run_dir / "final" / entry["name"]) for entry in GROUP_SAES}


def test_group_resumes_exactly_after_sigkill_at_random_points(tmp_path: Path) -> None:
    run_file = tmp_path / "group.toml"
    run_file.write_text(tomli_w.dumps(group_run("g", None, **LONGER)))
    reference = tmp_path / "reference"
    result = run_train(run_file, reference)
    assert result.returncode == 0, result.stderr

    seed = int(os.environ.get("LENSLAB_TEST_SEED", random.randrange(1 << 30)))
    points = sorted(random.Random(seed).sample(range(21, 58), 3))
    runs, run_dir = tmp_path / "runs", tmp_path / "runs" / "g"
    # First mid-commit: killed after the first file of the second checkpoint (step 20) is written.
    proc = start_train(run_file, runs, env={"LENSLAB_CRASH_POINT": "checkpoint-write:2"})
    proc.wait(timeout=300)
    assert proc.returncode == -9
    for step in points:
        proc = start_train(run_file, runs)
        wait_for_step(proc, run_dir, step)
        kill(proc)
        assert proc.returncode == -9, f"seed {seed}"
    result = run_train(run_file, runs)
    assert result.returncode == 0, result.stderr
    assert "resuming from step-" in result.stderr, f"seed {seed}"
    expected = finals(reference / "g")
    got = finals(run_dir)
    for name in expected:
        assert_bit_identical(got[name], expected[name])
