"""Kill the trainer with SIGKILL at many points; the resumed run must equal the reference bit for bit."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from lenslab_workspace.train.checkpoint import step_dirs, verify

from .conftest import (
    assert_bit_identical,
    final_weights,
    kill,
    run_train,
    start_train,
    wait_for_step,
    write_run_file,
)

pytestmark = pytest.mark.slow


def resumed_steps(output: str) -> list[str]:
    return [line.split("resuming from ")[1].split(" ")[0] for line in output.splitlines() if "resuming from" in line]


def test_sigkill_mid_step_at_many_points(tmp_path: Path, reference_run: dict[str, Any]) -> None:
    run_file = write_run_file(tmp_path / "run.toml")
    runs, run_dir = tmp_path / "runs", tmp_path / "runs" / "t"
    # Steps chosen to fall before the first checkpoint, between checkpoints, right after a
    # checkpoint was submitted (the write is still in flight) and near the end.
    for step in (3, 25, 41, 77, 110):
        proc = start_train(run_file, runs)
        wait_for_step(proc, run_dir, step)
        kill(proc)
        assert proc.returncode == -9
    result = run_train(run_file, runs)
    assert result.returncode == 0, result.stderr
    assert "resuming from step-" in result.stderr
    assert_bit_identical(final_weights(run_dir), reference_run)


@pytest.mark.parametrize("point", ["checkpoint-write:2", "checkpoint-rename:2", "checkpoint-write:5"])
def test_sigkill_mid_checkpoint_commit(tmp_path: Path, reference_run: dict[str, Any], point: str) -> None:
    run_file = write_run_file(tmp_path / "run.toml")
    runs, run_dir = tmp_path / "runs", tmp_path / "runs" / "t"
    crashed = run_train(run_file, runs, env={"LENSLAB_CRASH_POINT": point})
    assert crashed.returncode == -9
    # The half-written checkpoint is left as a .tmp-* directory, never as a step-* one.
    leftovers = [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    assert len(leftovers) == 1
    for path in step_dirs(run_dir / "checkpoints"):
        verify(path)
    result = run_train(run_file, runs)
    assert result.returncode == 0, result.stderr
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    assert_bit_identical(final_weights(run_dir), reference_run)


def test_damaged_latest_checkpoint_falls_back(tmp_path: Path, reference_run: dict[str, Any]) -> None:
    run_file = write_run_file(tmp_path / "run.toml")
    runs, run_dir = tmp_path / "runs", tmp_path / "runs" / "t"
    proc = start_train(run_file, runs)
    wait_for_step(proc, run_dir, 45)
    kill(proc)
    newest, previous, *_ = step_dirs(run_dir / "checkpoints")
    weights = newest / "sae_weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    weights.write_bytes(bytes(data))

    result = run_train(run_file, runs)
    assert result.returncode == 0, result.stderr
    assert f"skipping damaged checkpoint {newest.name}: sae_weights.safetensors fails its checksum" in result.stderr
    assert resumed_steps(result.stderr) == [previous.name]
    assert_bit_identical(final_weights(run_dir), reference_run)


@pytest.mark.parametrize("damage", ["truncate", "no-manifest"])
def test_other_damage_is_detected(tmp_path: Path, damage: str) -> None:
    run_file = write_run_file(tmp_path / "run.toml", {"training_tokens": 40_000})
    runs, run_dir = tmp_path / "runs", tmp_path / "runs" / "t"
    proc = start_train(run_file, runs)
    wait_for_step(proc, run_dir, 25)
    kill(proc)
    newest, previous, *_ = step_dirs(run_dir / "checkpoints")
    if damage == "truncate":
        state = newest / "trainer_state.pt"
        state.write_bytes(state.read_bytes()[:100])
        reason = "trainer_state.pt has the wrong size (truncated?)"
    else:
        (newest / "manifest.json").unlink()
        reason = "no manifest (an interrupted write)"
    result = run_train(run_file, runs)
    assert result.returncode == 0, result.stderr
    assert f"skipping damaged checkpoint {newest.name}: {reason}" in result.stderr
    assert resumed_steps(result.stderr) == [previous.name]


def test_no_checkpoint_restarts_from_scratch_identically(tmp_path: Path, reference_run: dict[str, Any]) -> None:
    run_file = write_run_file(tmp_path / "run.toml")
    runs = tmp_path / "runs"
    crashed = run_train(run_file, runs, env={"LENSLAB_CRASH_POINT": "checkpoint-write:1"})
    assert crashed.returncode == -9
    result = run_train(run_file, runs)
    assert result.returncode == 0
    assert "starting run 't' from scratch" in result.stderr
    assert_bit_identical(final_weights(runs / "t"), reference_run)


def test_sae_lens_loads_the_final_sae_and_a_checkpoint(tmp_path: Path) -> None:
    run_file = write_run_file(tmp_path / "run.toml", {"training_tokens": 30_000})
    runs = tmp_path / "runs"
    assert run_train(run_file, runs).returncode == 0
    script = (
        "import sys, torch\n"
        "from sae_lens import SAE, TrainingSAE\n"
        "sae = SAE.load_from_disk(sys.argv[1])\n"
        "out = sae(torch.randn(4, 32))\n"
        "assert out.shape == (4, 32), out.shape\n"
        "assert sae.cfg.metadata.hook_name == 'blocks.0.hook_resid_post'\n"
        "ckpt = TrainingSAE.load_from_disk(sys.argv[2])\n"
        "print(type(sae).__name__, type(ckpt).__name__, sae.cfg.d_sae)\n"
    )
    newest = sorted((runs / "t" / "checkpoints").glob("step-*"))[-1]
    out = subprocess.run(
        [__import__("sys").executable, "-c", script, str(runs / "t" / "final"), str(newest)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["TopKSAE", "TopKTrainingSAE", "128"]
