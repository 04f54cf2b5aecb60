"""``lenslab-eval`` on the tiny run: SAELens's own numbers, features, plots, and clean errors."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.analysis.conftest import CORPUS, lenslab_eval

pytestmark = pytest.mark.slow  # trains the tiny run once per session (about a minute)


class Rows:
    """The ActivationsStore interface SAELens's eval functions read tokens through."""

    def __init__(self, rows: np.ndarray, batch_size: int) -> None:
        self.rows, self.context_size, self.store_batch_size_prompts, self.at = rows, rows.shape[1], batch_size, 0

    def get_batch_tokens(self, n: int) -> torch.Tensor:
        batch = torch.from_numpy(np.asarray(self.rows[self.at : self.at + n], dtype=np.int64))
        self.at += n
        return batch

    def reset_input_dataset(self) -> None:
        self.at = 0


def saelens_reference(run_dir: Path, n_tokens: int) -> tuple[dict[str, float], list[float], int]:
    """SAELens's evaluation functions called directly on the rows lenslab-eval picks."""
    from sae_lens import SAE
    from sae_lens.evals import get_downstream_reconstruction_metrics, get_sparsity_and_variance_metrics
    from sae_lens.training.activation_scaler import ActivationScaler

    from lenslab_workspace.analysis import runs

    run = runs.open_run(run_dir, "cpu")
    batch = run.runner["store_batch_size_prompts"]
    rows = runs.eval_tokens(run, n_tokens, None).rows
    rows = rows[: rows.shape[0] // batch * batch]
    sae = SAE.load_from_disk(str(run_dir / "final"))
    ignore = runs.special_tokens(run)
    assert ignore == [256]  # the byte tokenizer's BOS, as run_evals would leave out special tokens
    n = rows.shape[0] // batch
    common: dict[str, Any] = {"n_batches": n, "eval_batch_size_prompts": batch, "ignore_tokens": ignore}
    downstream = get_downstream_reconstruction_metrics(
        sae,
        run.model,
        Rows(rows, batch),
        ActivationScaler(),
        compute_kl=True,
        compute_ce_loss=True,
        **common,  # type: ignore[arg-type]
    )
    sparsity, featurewise = get_sparsity_and_variance_metrics(
        sae, run.model, Rows(rows, batch), ActivationScaler(), compute_l2_norms=True,  # type: ignore[arg-type]
        compute_sparsity_metrics=True, compute_variance_metrics=True, compute_featurewise_density_statistics=True,
        model_kwargs={}, **common,
    )  # fmt: skip
    return {**downstream, **sparsity}, featurewise["feature_density"], rows.size


def test_metrics_equal_saelens_evaluation_functions_on_the_same_tokens(
    tiny_run: Path, evaluated: dict[str, Any]
) -> None:
    metrics = json.loads((tiny_run / "eval" / "metrics.json").read_text())["metrics"]
    expected, density, n_tokens = saelens_reference(tiny_run, 20000)
    assert metrics["tokens_evaluated"] == n_tokens
    for name in ("ce_loss_score", "ce_loss_with_sae", "ce_loss_without_sae", "ce_loss_with_ablation",
                 "kl_div_score", "kl_div_with_sae", "kl_div_with_ablation", "l0", "l1", "explained_variance",
                 "mse", "cossim", "l2_ratio"):  # fmt: skip
        assert metrics[name] == pytest.approx(expected[name], rel=1e-5, abs=1e-7), name
    # Dead/dense fractions and per-feature densities come from lenslab's own pass (collect);
    # they agree with SAELens's featurewise density on the same tokens.
    import pyarrow.parquet as pq

    table = pq.read_table(tiny_run / "eval" / "features.parquet").to_pylist()
    ours = np.array([r["density"] for r in table])
    np.testing.assert_allclose(ours, np.array(density), rtol=1e-6, atol=1e-9)
    assert metrics["dead_fraction"] == pytest.approx(float(np.mean(np.array(density) == 0)))
    assert metrics["dense_fraction"] == pytest.approx(float(np.mean(np.array(density) > 0.1)))
    assert 0 < metrics["dead_fraction"] < 1 and metrics["l0"] == pytest.approx(16.0)


def test_eval_dir_holds_features_plots_and_report(tiny_run: Path, evaluated: dict[str, Any]) -> None:
    import pyarrow.parquet as pq

    out = tiny_run / "eval"
    assert (
        sorted(p.name for p in out.iterdir())
        == sorted(evaluated["files"])
        == sorted(
            ["metrics.json", "features.parquet", "feature-density.png", "l0.png", "activations.png", "report.html"]
        )
    )
    for png in ("feature-density.png", "l0.png", "activations.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["held_out"] is True and summary["tokens_source"].startswith("held-out sequences")
    assert set(summary["versions"]) == {"lenslab-workspace", "sae-lens", "transformer-lens", "torch"}
    records = pq.read_table(out / "features.parquet").to_pylist()
    assert len(records) == 512 and sum(1 for r in records if r["contexts"]) == 64
    for record in (r for r in records if r["contexts"]):
        values = [c["value"] for c in record["contexts"]]
        assert values == sorted(values, reverse=True) and values[0] == pytest.approx(record["max_activation"])
        for c in record["contexts"]:
            # The activating token is the focus of its window, with the value of its top activation.
            assert c["activations"][c["focus"]] == pytest.approx(c["value"], rel=1e-4, abs=1e-4)
            assert len(c["tokens"]) == len(c["activations"])
            assert c["tokens"][c["focus"]] != "<bos>"
    # A context's text is text of the corpus (the byte tokenizer's tokens, decoded).
    corpus = CORPUS.read_text()
    plain = [
        "".join(c["tokens"])
        for r in records
        for c in r["contexts"]
        if all(len(t) == 1 for t in c["tokens"]) and len(c["tokens"]) > 8
    ]
    assert plain and all(text in corpus for text in plain)


def test_a_run_that_read_all_its_data_is_evaluated_on_its_last_rows(tiny_run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "tiny"
    shutil.copytree(tiny_run, copy, ignore=shutil.ignore_patterns("eval", "checkpoints"))
    # More than the ~50k held-out tokens: the run's own last sequences are used, and it says so.
    result = lenslab_eval(str(copy), "--tokens", "60000", "--features", "4", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["held_out"] is False and "no held-out data" in summary["tokens_source"]
    assert "evaluating on its last 938 training sequences" in result.stderr


def test_held_out_dataset_and_json_summary(tiny_run: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.jsonl"
    other.write_text(
        "".join(json.dumps({"text": f"Sentence number {i} about sparse features."}) + "\n" for i in range(400))
    )
    copy = tmp_path / "tiny"
    shutil.copytree(tiny_run, copy, ignore=shutil.ignore_patterns("eval", "checkpoints"))
    result = lenslab_eval(str(copy), "--dataset", str(other), "--tokens", "4096", "--features", "8", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["held_out"] is True and summary["metrics"]["tokens_evaluated"] == 4096
    assert summary["eval_dir"] == str(copy / "eval") and "report.html" in summary["files"]


def test_unfinished_run_is_evaluated_from_its_newest_checkpoint(tiny_run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "tiny"
    shutil.copytree(tiny_run, copy, ignore=shutil.ignore_patterns("eval", "final"))
    newest = sorted((copy / "checkpoints").iterdir())[-1]
    result = lenslab_eval(str(copy), "--tokens", "2048", "--features", "4", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["sae"] == str(newest) and "newest checkpoint" in result.stderr
    # A checkpoint's weights expect scaled inputs: evaluated with its scaler, the numbers are
    # those of a real SAE (the short run's SAE is weak, so no bound on their quality here).
    assert all(math.isfinite(v) for v in summary["metrics"].values())
    assert summary["metrics"]["l0"] == pytest.approx(16.0) and summary["metrics"]["explained_variance"] <= 1


def assert_one_line_error(result: Any, *words: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lenslab-eval: error:"), result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0]


def test_bad_inputs_are_one_line_errors_and_write_nothing(tiny_run: Path, tmp_path: Path) -> None:
    assert_one_line_error(lenslab_eval(str(tmp_path / "nope")), "unknown run")
    (tmp_path / "not-a-run").mkdir()
    assert_one_line_error(lenslab_eval(str(tmp_path / "not-a-run")), "not a lenslab run")

    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(tiny_run / "run-config.json", empty)
    assert_one_line_error(lenslab_eval(str(empty)), "no final SAE")

    copy = tmp_path / "tiny"
    shutil.copytree(tiny_run, copy, ignore=shutil.ignore_patterns("eval", "checkpoints"))
    assert_one_line_error(lenslab_eval(str(copy), "--dataset", str(tmp_path / "missing.jsonl")), "dataset")
    assert_one_line_error(lenslab_eval(str(copy), "--tokens", "100000000"), "too few tokens")
    small = tmp_path / "small.jsonl"
    small.write_text(json.dumps({"text": "only a few words"}) + "\n")
    assert_one_line_error(lenslab_eval(str(copy), "--dataset", str(small), "--tokens", "1000"), "too few tokens")
    assert not (copy / "eval").exists() and not list(copy.glob(".eval-tmp-*"))


def test_held_out_rows_start_after_every_row_training_stored_with_excluded_tokens(tmp_path: Path) -> None:
    """With exclude_special_tokens the trainer stores more rows than ``sequences_needed`` (to replace
    the dropped positions); held-out text must start after all of them, not overlap the last."""
    from lenslab_workspace.analysis import runs
    from lenslab_workspace.train.data import sequences_needed
    from tests.analysis.conftest import run_module, tiny_run_file

    run_file = tiny_run_file(tmp_path)
    text = run_file.read_text().replace("context_size = 64\n", "context_size = 64\nexclude_special_tokens = true\n")
    run_file.write_text(text)
    result = run_module(
        "lenslab_workspace.train.cli", str(run_file), "--runs-dir", str(tmp_path / "runs"), timeout=1800
    )
    assert result.returncode == 0, result.stderr[-2000:]
    run = runs.open_run(tmp_path / "runs" / "tiny", "cpu")
    (array_file,) = (run.root / "data").glob("tokens-*.npy")  # the trainer's rows; eval reuses them
    stored = np.load(array_file, mmap_mode="r").shape[0]
    assert stored > sequences_needed(run.runner, run.context_size)  # more rows than without exclusion
    tokens = runs.eval_tokens(run, 2_000, None)
    assert tokens.held_out and tokens.source.startswith(f"held-out sequences {stored}..")
    assert len(list((run.root / "data").glob("tokens-*.npy"))) == 1  # no second tokenization
