"""Every field of SAELens's LanguageModelSAERunnerConfig is honoured or refused with one line.

The test walks SAELens's own dataclass, so a SAELens release with a new field fails here
until the field is classified in lenslab_workspace/train/fields.py (and given a sample
value below). Behavioural checks for a representative set are in test_saelens_behaviour.py.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lenslab_workspace.train.config import load_run_file
from lenslab_workspace.train.fields import HONOURED, REFUSED, REPLACED, saelens_default

from .conftest import CORPUS, train_in_process, write_run_file

# A value other than SAELens's default (and other than the small run's) for every honoured
# field, with any other changes the value needs; `expected` is what SAELens's config holds.
SAMPLES: dict[str, dict[str, Any]] = {
    "model_name": {"value": "gpt2"},
    "model_class_name": {"value": "HookedMamba"},
    "hook_name": {"value": "blocks.1.hook_resid_pre"},
    "hook_eval": {"value": "blocks.0.hook_resid_pre"},
    "hook_head_index": {"value": 1},
    "dataset_path": {"value": "elsewhere.jsonl", "expected": "elsewhere.jsonl"},
    "dataset_trust_remote_code": {"value": False},
    "streaming": {"value": True},
    "is_dataset_tokenized": {"value": True},
    "use_chat_formatting": {"value": True, "changes": {"model_name": "gpt2"}},
    "context_size": {"value": 16},
    "cached_activations_path": {"value": "activations/here"},
    "from_pretrained_path": {"value": "/somewhere/final"},
    "n_batches_in_buffer": {"value": 40},
    "training_tokens": {"value": 50_000},
    "store_batch_size_prompts": {"value": 8},
    "seqpos_slice": {"value": [1, 30], "expected": (1, 30)},
    "disable_concat_sequences": {"value": True},
    "sequence_separator_token": {"value": "eos"},
    "activations_mixing_fraction": {"value": 0.25},
    "device": {"value": "cuda:1"},
    "llm_device": {"value": "cuda:2"},
    "act_store_device": {"value": "cuda:3"},
    "seed": {"value": 1234},
    "dtype": {"value": "bfloat16"},
    "prepend_bos": {"value": False},
    "autocast": {"value": True},
    "autocast_lm": {"value": True},
    "train_batch_size_tokens": {"value": 512},
    "adam_beta1": {"value": 0.8},
    "adam_beta2": {"value": 0.99},
    "lr": {"value": 1e-3},
    "lr_scheduler_name": {"value": "cosineannealingwarmrestarts"},
    "lr_warm_up_steps": {"value": 7},
    "lr_end": {"value": 1e-5},
    "lr_decay_steps": {"value": 9},
    "n_restart_cycles": {"value": 3},
    "dead_feature_window": {"value": 11},
    "feature_sampling_window": {"value": 13},
    "dead_feature_threshold": {"value": 1e-6},
    "n_eval_batches": {"value": 3},
    "eval_batch_size_prompts": {"value": 4},
    "verbose": {"value": False},
    "model_kwargs": {"value": {"return_type": "loss"}},
    "model_from_pretrained_kwargs": {"value": {"center_writing_weights": True}},
    "sae_lens_version": {"value": "0.0.1"},
    "sae_lens_training_version": {"value": "0.0.2"},
    "exclude_special_tokens": {"value": [0, 5]},
    "n_batches_for_norm_estimate": {"value": 17},
    "prefetch_llm_batches": {"value": 2},
}
# The two tables: a value inside each reaches SAELens's config there.
TABLE_SAMPLES = {"sae": ("d_sae", 96), "logger": ("wandb_project", "elsewhere")}
# What each refused field is set to (not SAELens's default).
REFUSED_SAMPLES: dict[str, Any] = {
    "use_cached_activations": True,
    "resume_from_checkpoint": "checkpoints/abc",
    "compile_llm": True,
    "compile_sae": True,
    "llm_compilation_mode": "max-autotune",
    "sae_compilation_mode": "max-autotune",
}
REPLACED_SAMPLES: dict[str, Any] = {
    "n_checkpoints": 5,
    "checkpoint_path": "my-checkpoints",
    "save_final_checkpoint": True,
    "output_path": "my-output",
}


def saelens_field_names() -> list[str]:
    from sae_lens import LanguageModelSAERunnerConfig

    return [f.name for f in dataclasses.fields(LanguageModelSAERunnerConfig)]


def test_every_saelens_field_is_honoured_or_refused() -> None:
    names = saelens_field_names()
    tables = {"honoured": HONOURED.keys(), "replaced": REPLACED.keys(), "refused": REFUSED.keys()}
    for name in names:
        homes = [table for table, keys in tables.items() if name in keys]
        assert len(homes) == 1, f"SAELens field {name!r} must be in exactly one table of fields.py, is in {homes}"
    stale = (HONOURED.keys() | REPLACED.keys() | REFUSED.keys()) - set(names)
    assert not stale, f"fields.py names fields SAELens does not have: {sorted(stale)}"
    # Every classified field has a check below.
    assert HONOURED.keys() == SAMPLES.keys() | TABLE_SAMPLES.keys()
    assert REFUSED.keys() == REFUSED_SAMPLES.keys()
    assert REPLACED.keys() == REPLACED_SAMPLES.keys()


@pytest.mark.parametrize("field", sorted(SAMPLES))
def test_an_honoured_value_reaches_the_saelens_config(tmp_path: Path, field: str) -> None:
    sample = SAMPLES[field]
    value = sample["value"]
    if field == "dataset_path":
        (tmp_path / value).write_bytes(CORPUS.read_bytes())
    settings = load_run_file(write_run_file(tmp_path / "run.toml", {**sample.get("changes", {}), field: value}))
    expected = sample.get("expected", value)
    if field == "dataset_path":
        expected = str(tmp_path / value)
    without = load_run_file(write_run_file(tmp_path / "base.toml", sample.get("changes", {}))).runner_config()
    assert getattr(without, field) != expected  # so the value below can only have come from the run file
    assert getattr(settings.runner_config(), field) == expected


def test_act_store_device_with_model_is_the_models_device(tmp_path: Path) -> None:
    """SAELens's legacy spelling: the mixing buffer lives with the model."""
    from lenslab_workspace.train.data import ActivationStream
    from lenslab_workspace.train.launch import check_devices

    settings = load_run_file(write_run_file(tmp_path / "run.toml", {"act_store_device": "with_model"}))
    check_devices(settings)
    assert settings.runner_config().act_store_device == "cpu"
    tokens = np.zeros((32, 32), dtype=np.int32)
    stream = ActivationStream(None, tokens, {**settings.runner_fields, "llm_device": "meta"}, 32, None)
    assert stream.store_device == torch.device("meta")


@pytest.mark.parametrize("table", sorted(TABLE_SAMPLES))
def test_a_table_value_reaches_the_saelens_config(tmp_path: Path, table: str) -> None:
    key, value = TABLE_SAMPLES[table]
    cfg = load_run_file(write_run_file(tmp_path / "run.toml", {table: {key: value}})).runner_config()
    assert getattr(getattr(cfg, table), key) == value


@pytest.mark.parametrize("field", sorted(REPLACED_SAMPLES))
def test_a_replaced_field_is_accepted_and_noted(tmp_path: Path, field: str) -> None:
    settings = load_run_file(write_run_file(tmp_path / "run.toml", {field: REPLACED_SAMPLES[field]}))
    cfg = settings.runner_config()
    # lenslab's run directory holds the checkpoints and the final SAE, not SAELens's paths.
    assert (cfg.checkpoint_path, cfg.output_path) == (None, None)
    assert any(f"'{field}'" in note for note in settings.notes)


@pytest.mark.parametrize("field", sorted(REFUSED_SAMPLES))
def test_a_refused_field_is_one_line_exit_2(tmp_path: Path, field: str, capsys: pytest.CaptureFixture[str]) -> None:
    run_file = write_run_file(tmp_path / "run.toml", {field: REFUSED_SAMPLES[field]})
    runs = tmp_path / "runs"
    code, err = train_in_process([str(run_file), "--runs-dir", str(runs)], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lenslab-train: error: "), err
    assert f"field '{field}'" in lines[0]
    assert not runs.exists() or not any(runs.iterdir())


# TOML has no null: a field whose default is None (the text-valued ones) is at its default
# by being left out; the switches are written out as false.
@pytest.mark.parametrize("field", sorted(f for f, v in REFUSED_SAMPLES.items() if not isinstance(v, str)))
def test_a_refused_field_at_its_default_is_accepted(tmp_path: Path, field: str) -> None:
    assert saelens_default(field) is not None
    settings = load_run_file(write_run_file(tmp_path / "run.toml", {field: saelens_default(field)}))
    assert getattr(settings.runner_config(), field) == saelens_default(field)
