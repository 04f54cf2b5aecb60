"""A group of 4 SAEs over 2 hooks killed with SIGKILL at random points resumes bit-exactly (with
prefetch and a streamed dataset too), and its wandb run continues with each step once."""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from .conftest import assert_bit_identical, kill, run_train, start_train, wait_for, wait_for_step
from .test_group import GROUP_SAES, group_run, weights

pytestmark = pytest.mark.slow

LONGER: dict[str, Any] = {"training_tokens": 61_440}  # 60 steps, a checkpoint every 10


def finals(run_dir: Path) -> dict[str, dict[str, object]]:
    return {entry["name"]: weights(run_dir / "final" / entry["name"]) for entry in GROUP_SAES}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, object]]:
    """The group's SAEs trained without interruption, prefetch or streaming."""
    tmp = tmp_path_factory.mktemp("group-reference")
    run_file = tmp / "group.toml"
    run_file.write_text(tomli_w.dumps(group_run("g", None, **LONGER)))
    result = run_train(run_file, tmp / "runs")
    assert result.returncode == 0, result.stderr
    return finals(tmp / "runs" / "g")


def kill_and_finish(run_file: Path, runs: Path, points: list[int], seed: int) -> None:
    """SIGKILL a launch at each step of ``points``, then let one launch finish."""
    for step in points:
        proc = start_train(run_file, runs)
        wait_for_step(proc, runs / "g", step)
        kill(proc)
        assert proc.returncode == -9, f"seed {seed}"
    result = run_train(run_file, runs)
    assert result.returncode == 0, result.stderr
    assert "resuming from step-" in result.stderr, f"seed {seed}"


def assert_same_finals(run_dir: Path, expected: dict[str, dict[str, object]], what: str) -> None:
    got = finals(run_dir)
    for name in expected:
        try:
            assert_bit_identical(got[name], expected[name])
        except AssertionError as exc:
            raise AssertionError(f"SAE {name}, {what}: {exc}") from exc


def test_group_resumes_exactly_after_sigkill_at_random_points(
    tmp_path: Path, reference: dict[str, dict[str, object]]
) -> None:
    run_file = tmp_path / "group.toml"
    run_file.write_text(tomli_w.dumps(group_run("g", None, **LONGER)))
    seed = int(os.environ.get("LENSLAB_TEST_SEED", random.randrange(1 << 30)))
    points = sorted(random.Random(seed).sample(range(21, 58), 3))
    runs = tmp_path / "runs"
    # First mid-commit: killed after the first file of the second checkpoint (step 20) is written.
    proc = start_train(run_file, runs, env={"LENSLAB_CRASH_POINT": "checkpoint-write:2"})
    proc.wait(timeout=300)
    assert proc.returncode == -9
    kill_and_finish(run_file, runs, points, seed)
    assert_same_finals(runs / "g", reference, f"killed at steps {points} (seed {seed})")


def test_group_with_prefetch_and_a_streamed_dataset_resumes_exactly(
    tmp_path: Path, reference: dict[str, dict[str, object]]
) -> None:
    # Batches in flight in every stream's prefetch thread (two refills ahead) at each kill, and
    # a local dataset tokenized in the background: the SAEs of the uninterrupted plain run.
    changes = {**LONGER, "prefetch_llm_batches": 2, "streaming": True}
    run_file = tmp_path / "group.toml"
    run_file.write_text(tomli_w.dumps(group_run("g", None, **changes)))
    seed = int(os.environ.get("LENSLAB_TEST_SEED", random.randrange(1 << 30)))
    chooser = random.Random(seed)
    points = [chooser.randint(2, 19), chooser.randint(21, 39), chooser.randint(41, 58)]
    kill_and_finish(run_file, tmp_path / "runs", points, seed)
    assert_same_finals(tmp_path / "runs" / "g", reference, f"killed at steps {points} (seed {seed})")


def test_group_wandb_run_killed_and_resumed_logs_each_step_once(tmp_path: Path) -> None:
    # One wandb run for the group (as SAELens's multi-SAE runner), each SAE's records under its
    # name; read back offline with wandb's own reader.
    pytest.importorskip("wandb")
    from lenslab_workspace.train.wandb_log import CHECKPOINT_FILE, ID_FILE

    from .test_wandb_resume import LOGGER, launch_files, read_records, read_runs, wait_until_wandb_has, wandb_env

    env = wandb_env(tmp_path)
    changes = {**LONGER, "logger": LOGGER}
    reference = tmp_path / "reference"
    reference.mkdir()
    (reference / "group.toml").write_text(tomli_w.dumps(group_run("g", None, **changes)))
    done = run_train(reference / "group.toml", reference / "runs", env=env)
    assert done.returncode == 0, done.stderr
    ref_ids, ref_rows = read_runs(reference / "runs" / "g")
    expected = dict(ref_rows)
    assert len(ref_ids) == 1 and len(expected) == len(ref_rows) and sorted(expected)[:60] == list(range(60))
    for entry in GROUP_SAES:  # every SAE's train records and histograms, under its name
        assert all(f"{entry['name']}/losses/mse_loss" in expected[step] for step in range(60))
        assert f"{entry['name']}/weights/W_dec_norms._type" in expected[19]
    assert all(expected[step]["details/n_training_samples"] == (step + 1) * 1024 for step in range(60))
    (run_record,) = [r["run"] for r in read_records(launch_files(reference / "runs" / "g")[0]) if r["type"] == "run"]
    assert run_record["display_name"].startswith("multi-jumprelu+standard+topk-N4-")
    artifacts = [r for r in read_records(launch_files(reference / "runs" / "g")[0]) if r["type"] == "artifact"]
    assert len(artifacts) >= len(GROUP_SAES)  # each final SAE, as SAELens logs it

    run_file = tmp_path / "group.toml"
    run_file.write_text(tomli_w.dumps(group_run("g", None, **changes)))
    runs, run_dir = tmp_path / "runs", tmp_path / "runs" / "g"
    proc = start_train(run_file, runs, env=env)  # killed right after the checkpoint at step 20
    wait_for(lambda: (run_dir / "checkpoints" / "step-000000020" / "manifest.json").exists(), what="checkpoint 20")
    kill(proc)
    known = launch_files(run_dir)
    proc = start_train(run_file, runs, env=env)  # killed once wandb has steps past a later checkpoint
    wait_until_wandb_has(proc, run_dir, known, 44)
    kill(proc)
    assert proc.returncode == -9
    result = run_train(run_file, runs, env=env)
    assert result.returncode == 0, result.stderr
    assert "resuming from step-" in result.stderr

    assert len(launch_files(run_dir)) == 3  # three launches of one run
    ids, rows = read_runs(run_dir)
    run_id = json.loads((run_dir / ID_FILE).read_text())["run_id"]
    assert ids == {run_id}
    for checkpoint in (run_dir / "checkpoints").glob("step-*"):
        assert json.loads((checkpoint / CHECKPOINT_FILE).read_text())["run_id"] == run_id
    steps = [step for step, _ in rows]
    assert [s for s, n in Counter(steps).items() if n > 1] == []  # no step twice
    assert sorted(steps) == sorted(expected)  # and none missing
    for step, values in rows:
        assert values == expected[step], f"step {step} differs from the uninterrupted run"
