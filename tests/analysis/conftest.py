"""Fixtures for the analysis tests: the tiny run trained once per session, evaluated once."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "workspace" / "configs" / "tiny.toml"
CORPUS = REPO / "workspace" / "configs" / "data" / "tiny-corpus.jsonl"


def run_module(module: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def lenslab_eval(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return run_module("lenslab_workspace.analysis.cli", *args, timeout=timeout)


# The quick start's run, shortened: 300k tokens leave ~50k tokens of the corpus unread, so the
# evaluation has held-out text, and it trains in about 15 s (minutes on a loaded machine).
TRAINING_TOKENS = 300_000


def tiny_run_file(dest: Path) -> Path:
    text = TINY.read_text()
    text = re.sub(r"(?m)^training_tokens = .*$", f"training_tokens = {TRAINING_TOKENS}", text)
    text = re.sub(r"(?m)^dataset_path = .*$", f'dataset_path = "{CORPUS}"', text)
    # Checkpoints at fixed points (not every 10 s of a machine's speed): ~100k and ~200k tokens.
    text = re.sub(r"(?m)^checkpoint_every_seconds = .*$", "checkpoint_every_seconds = 3600", text)
    text = text.replace("[resilience]\n", "[resilience]\ncheckpoint_every_tokens = 100_000\n")
    path = dest / "tiny.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """workspace/configs/tiny.toml with fewer training tokens, trained to the end once."""
    base = tmp_path_factory.mktemp("analysis")
    runs = base / "runs"
    result = run_module("lenslab_workspace.train.cli", str(tiny_run_file(base)), "--runs-dir", str(runs), timeout=1800)
    assert result.returncode == 0, result.stderr[-2000:]
    return runs / "tiny"


@pytest.fixture(scope="session")
def evaluated(tiny_run: Path) -> dict[str, Any]:
    """``lenslab-eval`` of the tiny run, once: its --json summary."""
    result = lenslab_eval(str(tiny_run), "--tokens", "20000", "--features", "64", "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    summary: dict[str, Any] = json.loads(result.stdout)
    return summary
