"""Run files: SAELens's field names, and one clear line for every mistake."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lenslab_workspace.train.config import load_run_file
from lenslab_workspace.train.errors import RunConfigError

from .conftest import CORPUS, SMALL_RUN, merge, run_train, start_train, wait_for_step, write_run_file


def error_for(tmp_path: Path, text: str) -> str:
    path = tmp_path / "run.toml"
    path.write_text(text)
    with pytest.raises(RunConfigError) as info:
        load_run_file(path)
    message = str(info.value)
    assert "\n" not in message
    return message.replace(str(path), "run.toml")


BASE = f'name = "t"\nmodel_name = "tiny-random"\ndataset_path = "{CORPUS}"\n'


def test_saelens_fields_map_one_to_one(tmp_path: Path) -> None:
    settings = load_run_file(write_run_file(tmp_path / "run.toml"))
    cfg = settings.runner_config()
    assert type(cfg).__name__ == "LanguageModelSAERunnerConfig"
    assert (cfg.context_size, cfg.train_batch_size_tokens, cfg.lr) == (32, 1024, 3e-4)
    assert type(cfg.sae).__name__ == "TopKTrainingSAEConfig" and cfg.sae.k == 8


@pytest.mark.parametrize("architecture", ["standard", "topk", "batchtopk", "jumprelu"])
def test_architectures(tmp_path: Path, architecture: str) -> None:
    sae = {"architecture": architecture, "d_in": 32, "d_sae": 64}
    if architecture in ("topk", "batchtopk"):
        sae["k"] = 4
    path = tmp_path / "run.toml"
    import tomli_w

    path.write_text(tomli_w.dumps(merge({k: v for k, v in SMALL_RUN.items() if k != "sae"}, {"sae": sae})))
    cfg = load_run_file(path).runner_config()
    assert cfg.sae.architecture() == architecture


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            BASE + "contex_size = 64\n[sae]\nd_in = 4\nd_sae = 8\n",
            "run.toml: unknown field 'contex_size' in the top level (did you mean 'context_size'?)",
        ),
        (
            BASE + "[sae]\nd_in = 4\nd_sae = 8\nkk = 3\narchitecture = 'topk'\n",
            "run.toml: unknown field 'sae.kk' in [sae] (did you mean 'sae.k'?)",
        ),
        (
            BASE + "[sae]\nd_in = 'wide'\nd_sae = 8\n",
            "run.toml: field 'sae.d_in': Input should be a valid integer (got 'wide')",
        ),
        (BASE + "[sae]\nd_in = 4\n", "run.toml: field 'sae.d_sae': is required"),
        (
            BASE + "[sae]\narchitecture = 'dense'\nd_in = 4\nd_sae = 8\n",
            "run.toml: field 'sae.architecture': unknown architecture 'dense'; choose one of abstopk, batchtopk, "
            "gated, jumprelu, matching_pursuit, matryoshka_batchtopk, standard, topk",
        ),
        ('model_name = "x"\ndataset_path = "d"\n[sae]\nd_in = 4\nd_sae = 8\n', "run.toml: field 'name': is required"),
        (
            BASE.replace('"t"', '"../up"') + "[sae]\nd_in = 4\nd_sae = 8\n",
            "run.toml: field 'name': a run name is 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (got '../up')",
        ),
        (
            BASE + "[sae]\nd_in = 4\nd_sae = 8\n[resilience]\nkeep_last = 0\n",
            "run.toml: field 'resilience.keep_last': Input should be greater than or equal to 1 (got 0)",
        ),
        (
            BASE + "[sae]\nd_in = 4\nd_sae = 8\n[logger]\nlog_optimizer_state_to_wandb = true\n",
            "run.toml: field 'logger.log_optimizer_state_to_wandb': not supported by lenslab-train; set it to false",
        ),
        (
            BASE + "compile_llm = true\n[sae]\nd_in = 4\nd_sae = 8\n",
            "run.toml: field 'compile_llm': torch.compile is not supported by lenslab-train; set it to false",
        ),
        (
            'name = "t"\nmodel_name = "tiny-random"\n[sae]\nd_in = 4\nd_sae = 8\n',
            "run.toml: field 'dataset_path' is required: "
            "a Hugging Face dataset name or a local .jsonl/.parquet/.arrow file",
        ),
        ("name = [\n", "run.toml: not valid TOML: Invalid value (at end of document)"),
    ],
)
def test_malformed_run_files(tmp_path: Path, text: str, expected: str) -> None:
    assert error_for(tmp_path, text) == expected


@pytest.mark.slow  # a fresh interpreter importing torch and sae-lens
def test_cli_error_is_one_line_without_traceback(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text(BASE + "[sae]\nd_in = 4\nd_sae = 'many'\n")
    result = subprocess.run(
        [sys.executable, "-m", "lenslab_workspace.train.cli", str(path), "--runs-dir", str(tmp_path / "runs")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"lenslab-train: error: {path}: field 'sae.d_sae': Input should be a valid integer (got 'many')"
    ]
    assert not (tmp_path / "runs" / "t").exists()


@pytest.mark.slow  # a fresh interpreter importing torch and sae-lens
def test_missing_run_file(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lenslab_workspace.train.cli", str(tmp_path / "nope.toml")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"lenslab-train: error: {tmp_path / 'nope.toml'}: no such run file; pass the path of a .toml run file"
    )


@pytest.mark.slow
def test_changed_config_is_refused_naming_fields_and_harmless_changes_pass(tmp_path: Path) -> None:
    runs, run_dir = tmp_path / "runs", tmp_path / "runs" / "t"
    run_file = write_run_file(tmp_path / "run.toml", {"training_tokens": 60_000})
    proc = start_train(run_file, runs)
    wait_for_step(proc, run_dir, 15)
    proc.kill()
    proc.wait()
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())

    write_run_file(run_file, {"training_tokens": 60_000, "lr": 1e-3, "sae": {"d_sae": 256}})
    refused = run_train(run_file, runs)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        "lenslab-train: error: run 't' was started with another config; these fields differ: runner.lr, sae.d_sae. "
        "Restore them, or start over with --fresh (the old run is kept), or use a new name"
    )
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before

    write_run_file(
        run_file, {"training_tokens": 60_000, "resilience": {"checkpoint_every_tokens": 20480, "keep_last": 2}}
    )
    allowed = run_train(run_file, runs)
    assert allowed.returncode == 0, allowed.stderr
    assert "resuming from step-" in allowed.stderr


@pytest.mark.slow
def test_fresh_keeps_the_old_run(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    run_file = write_run_file(tmp_path / "run.toml", {"training_tokens": 20_000})
    assert run_train(run_file, runs).returncode == 0
    again = run_train(run_file, runs, "--fresh")
    assert again.returncode == 0, again.stderr
    assert "starting run 't' from scratch" in again.stderr
    kept = [p for p in runs.iterdir() if p.name.startswith("t.old-")]
    assert len(kept) == 1
    assert (kept[0] / "final" / "sae_weights.safetensors").exists()
    assert (runs / "t" / "final" / "sae_weights.safetensors").exists()
