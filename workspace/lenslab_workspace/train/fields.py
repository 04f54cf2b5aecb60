"""What lenslab does with each field of SAELens's ``LanguageModelSAERunnerConfig``.

Every field is in exactly one table:

- ``HONOURED``: it means what it means in SAELens. Most are passed into SAELens's own config
  and used by SAELens's trainer or by lenslab's data stream (which mirrors SAELens's
  ``ActivationsStore``); the note says where.
- ``REPLACED``: SAELens's output and checkpoint locations. lenslab keeps the run, its
  checkpoints and ``final/`` under ``runs/<name>/`` instead; the field is accepted (so a
  SAELens config file loads) and a line in ``train.log`` says it is replaced.
- ``REFUSED``: a value other than SAELens's default is refused with one line (exit 2) that
  names the field and how to fix it; the default itself is accepted.

The ``[sae]`` and ``[logger]`` tables are the fields ``sae`` and ``logger``; the fields inside
them are SAELens's architecture configs and ``LoggingConfig`` (handled in config.py).
A SAELens release with a new field fails the test that walks these tables until the field
is classified here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lenslab_workspace.train.errors import RunConfigError

HONOURED: dict[str, str] = {
    "sae": "the [sae] table: architecture plus its TrainingSAEConfig",
    "logger": "the [logger] table: SAELens's LoggingConfig",
    "model_name": "TransformerLens model (sae_lens.load_model), or lenslab's tiny-random",
    "model_class_name": "passed to sae_lens.load_model",
    "hook_name": "the hook the data stream reads",
    "hook_eval": "deprecated and unused, as in SAELens",
    "hook_head_index": "the data stream selects that head",
    "dataset_path": "a local file/directory or a Hugging Face dataset",
    "dataset_trust_remote_code": "passed to datasets.load_dataset",
    "streaming": "passed to datasets.load_dataset (a local file too when set to true); tokenized in the background",
    "prefetch_llm_batches": "the model's batches are made in a background thread (true = 1 refill ahead, n = n)",
    "is_dataset_tokenized": "as in SAELens 6.54 the columns decide (tokens/input_ids vs text/problem)",
    "use_chat_formatting": "rows are tokenized with the tokenizer's chat template",
    "context_size": "sequence length of the token array",
    "cached_activations_path": "used only with use_cached_activations (refused), as in SAELens",
    "from_pretrained_path": "the SAE starts from one saved in SAELens's format (safetensors)",
    "n_batches_in_buffer": "mixing buffer size = n_batches_in_buffer x context (after seqpos_slice)",
    "training_tokens": "the run's length",
    "store_batch_size_prompts": "sequences per model forward pass",
    "seqpos_slice": "the data stream slices positions",
    "disable_concat_sequences": "passed to concat_and_batch_sequences",
    "sequence_separator_token": "passed to concat_and_batch_sequences",
    "activations_mixing_fraction": "the mixing buffer's kept fraction",
    "device": "the SAE's device",
    "llm_device": "the model's device",
    "act_store_device": "where the mixing buffer lives",
    "seed": "python, numpy and torch RNGs; the tiny-random model's weights unless [tiny_random] seed",
    "dtype": "passed to SAELens (it only affects cached activations there)",
    "prepend_bos": "a BOS starts each concatenated sequence",
    "autocast": "SAETrainer's autocast",
    "autocast_lm": "the model forward pass runs under bfloat16 autocast",
    "train_batch_size_tokens": "SAETrainer's batch",
    "adam_beta1": "SAETrainer's optimizer",
    "adam_beta2": "SAETrainer's optimizer",
    "lr": "SAETrainer's optimizer",
    "lr_scheduler_name": "SAETrainer's scheduler",
    "lr_warm_up_steps": "SAETrainer's scheduler",
    "lr_end": "SAETrainer's scheduler",
    "lr_decay_steps": "SAETrainer's scheduler",
    "n_restart_cycles": "SAETrainer's scheduler",
    "dead_feature_window": "SAETrainer's dead-feature statistics",
    "feature_sampling_window": "SAETrainer's sparsity window",
    "dead_feature_threshold": "SAETrainer's dead-feature statistics",
    "n_eval_batches": "evaluations, which SAELens runs only when logging to wandb",
    "eval_batch_size_prompts": "evaluations, which SAELens runs only when logging to wandb",
    "verbose": "passed to SAELens; lenslab shows its own progress",
    "model_kwargs": "passed to the model's run_with_cache",
    "model_from_pretrained_kwargs": "passed to sae_lens.load_model",
    "sae_lens_version": "recorded in the config",
    "sae_lens_training_version": "recorded in the config",
    "exclude_special_tokens": "those token positions are dropped; the token budget counts only kept ones",
    "n_batches_for_norm_estimate": "batches for the activation scaler's estimate",
}

REPLACED: dict[str, str] = {
    "n_checkpoints": "lenslab checkpoints every [resilience] checkpoint_every_seconds/_tokens",
    "checkpoint_path": "checkpoints go to runs/<name>/checkpoints",
    "save_final_checkpoint": "the final SAE is always saved in runs/<name>/final",
    "output_path": "the final SAE is saved in runs/<name>/final",
}

REFUSED: dict[str, str] = {
    "use_cached_activations": "cached activations are not resumable by lenslab yet; set it to false",
    "resume_from_checkpoint": "lenslab resumes by itself: run the same command again; remove the field",
    "compile_llm": "torch.compile is not supported by lenslab-train; set it to false",
    "compile_sae": "torch.compile is not supported by lenslab-train; set it to false",
    "llm_compilation_mode": "torch.compile is not supported by lenslab-train; remove the field",
    "sae_compilation_mode": "torch.compile is not supported by lenslab-train; remove the field",
}


def saelens_default(name: str) -> Any:
    """SAELens's default value of a runner field (imports sae_lens)."""
    import dataclasses

    from sae_lens import LanguageModelSAERunnerConfig

    for item in dataclasses.fields(LanguageModelSAERunnerConfig):
        if item.name == name:
            if item.default is not dataclasses.MISSING:
                return item.default
            if item.default_factory is not dataclasses.MISSING:
                return item.default_factory()
    raise KeyError(name)


def check_refused(source: Path, fields: dict[str, Any]) -> None:
    """A refused field set to anything but SAELens's default: one line naming it."""
    for key, why in REFUSED.items():
        if key in fields and fields[key] != saelens_default(key):
            raise RunConfigError(f"{source}: field '{key}': {why}")


def replaced_notes(fields: dict[str, Any]) -> list[str]:
    """One line per REPLACED field the run file sets, for train.log."""
    return [f"field '{key}' is replaced by lenslab: {REPLACED[key]}" for key in sorted(REPLACED) if key in fields]
