"""Helpers for the training tests: small run files and real ``lenslab-train`` processes."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tomli_w

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "workspace" / "configs" / "data" / "tiny-corpus.jsonl"

# Small enough for a few seconds of training on two CPU cores, big enough for ~120 steps,
# several mixing-buffer refills, a sparsity-window reset and a data epoch boundary.
SMALL_RUN: dict[str, Any] = {
    "name": "t",
    "model_name": "tiny-random",
    "hook_name": "blocks.0.hook_resid_post",
    "dataset_path": str(CORPUS),
    "is_dataset_tokenized": False,
    "streaming": False,
    "context_size": 32,
    "training_tokens": 120_000,
    "train_batch_size_tokens": 1024,
    "store_batch_size_prompts": 16,
    "n_batches_in_buffer": 64,
    "n_batches_for_norm_estimate": 5,
    "lr": 3e-4,
    "lr_warm_up_steps": 10,
    "feature_sampling_window": 50,
    "dead_feature_window": 50,
    "seed": 7,
    "device": "cpu",
    "sae": {
        "architecture": "topk",
        "d_in": 32,
        "d_sae": 128,
        "k": 8,
        "normalize_activations": "expected_average_only_in",
    },
    "tiny_random": {"n_layers": 1, "d_model": 32, "n_heads": 2, "d_head": 16, "d_mlp": 64, "n_ctx": 64},
    "resilience": {
        "checkpoint_every_seconds": 1000,
        "checkpoint_every_tokens": 10240,
        "keep_last": 3,
        "status_every_seconds": 0.05,
    },
}


def merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    result = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merge(result[key], value)
        else:
            result[key] = value
    return result


def write_run_file(path: Path, changes: dict[str, Any] | None = None) -> Path:
    path.write_text(tomli_w.dumps(merge(SMALL_RUN, changes or {})))
    return path


def train_command(run_file: Path, runs_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lenslab_workspace.train.cli", str(run_file), "--runs-dir", str(runs_dir), *extra]


def run_train(
    run_file: Path, runs_dir: Path, *extra: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        train_command(run_file, runs_dir, *extra),
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def start_train(
    run_file: Path, runs_dir: Path, *extra: str, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        train_command(run_file, runs_dir, *extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )


def read_status(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / "status.json").read_text())  # type: ignore[no-any-return]
    except (FileNotFoundError, ValueError):
        return None


def wait_for(condition: Callable[[], bool], timeout: float = 120, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def wait_for_step(proc: subprocess.Popen[str], run_dir: Path, step: int) -> None:
    def reached() -> bool:
        status = read_status(run_dir)
        if proc.poll() is not None:
            raise AssertionError(
                f"trainer exited early ({proc.returncode}): {proc.stdout.read() if proc.stdout else ''}"
            )
        return status is not None and status["state"] == "running" and status["step"] >= step

    wait_for(reached, what=f"step {step}")


def kill(proc: subprocess.Popen[str], sig: int = signal.SIGKILL) -> None:
    proc.send_signal(sig)
    proc.wait(timeout=60)


def final_weights(run_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "sae_weights.safetensors"))


def assert_bit_identical(a: dict[str, Any], b: dict[str, Any]) -> None:
    import torch

    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs: max |diff| {(a[key] - b[key]).abs().max().item()}"


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Final weights of the small run trained once, without interruption."""
    tmp = tmp_path_factory.mktemp("reference")
    result = run_train(write_run_file(tmp / "run.toml"), tmp / "runs")
    assert result.returncode == 0, result.stderr
    return final_weights(tmp / "runs" / "t")


def tree_digest(root: Path) -> dict[str, str]:
    """Every path under ``root`` with its content hash (directories as "dir"): equal digests
    mean a byte-identical tree."""
    import hashlib

    digest: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        digest[key] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return digest


def train_in_process(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``lenslab-train`` run in this process (fast: no interpreter or torch start-up): exit code, stderr."""
    from lenslab_workspace.train.cli import main

    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err


@pytest.fixture(scope="session")
def existing_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A runs directory holding one short finished run 't' (and its run file): what a refused
    launch must leave byte-identical."""
    tmp = tmp_path_factory.mktemp("existing")
    run_file = write_run_file(tmp / "run.toml", {"training_tokens": 10_240})
    result = run_train(run_file, tmp / "runs")
    assert result.returncode == 0, result.stderr
    return tmp / "runs", run_file
