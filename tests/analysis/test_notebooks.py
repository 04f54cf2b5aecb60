"""The notebooks in workspace/notebooks/ execute from top to bottom (nbclient, the tiny model)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.analysis.conftest import REPO

NOTEBOOKS = REPO / "workspace" / "notebooks"

pytestmark = pytest.mark.slow  # each trains a tiny SAE


def execute(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, int]:
    """Run the notebook in a fresh kernel: all its text outputs as one text, and its PNG count."""
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("LENSLAB_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("LENSLAB_DRIVE_DIR", str(tmp_path / "drive"))  # stands in for Google Drive
    monkeypatch.setenv("LENSLAB_NOTEBOOK_TOKENS", "200000")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(book, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    texts, pngs = [], 0
    for cell in book.cells:
        for output in cell.get("outputs", []):
            texts.append(output.get("text", "") + str(output.get("data", {}).get("text/plain", "")))
            pngs += "image/png" in output.get("data", {})
    return "\n".join(texts), pngs


def test_train_interrupt_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out, _ = execute("01-train-interrupt-resume.ipynb", tmp_path, monkeypatch)
    assert "exit code 75" in out and "resuming from step-" in out
    assert (tmp_path / "runs" / "nb-resume" / "final" / "sae_weights.safetensors").exists()


def test_evaluate_and_explore(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out, pngs = execute("02-evaluate-and-explore.ipynb", tmp_path, monkeypatch)
    assert "ce_loss_score" in out and "of features dead" in out
    assert pngs == 3  # two plots written by lenslab-eval, one drawn inline from collect's results
    assert (tmp_path / "runs" / "nb-eval" / "eval" / "report.html").exists()


def test_colab_drive_resume_after_wiped_runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out, _ = execute("03-colab-drive.ipynb", tmp_path, monkeypatch)
    assert "resuming from step-" in out and "local run directory deleted" in out
    assert (tmp_path / "drive" / "mirror" / "nb-drive" / "latest").exists()
    assert (tmp_path / "drive" / "nb-drive-final" / "sae_weights.safetensors").exists()
