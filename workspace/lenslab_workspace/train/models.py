"""The language model whose activations the SAE learns, and the SAE training starts from.

The model is a TransformerLens model by name, or ``tiny-random`` for offline use (tests, the
quick start, a laptop without a GPU); the SAE is new, or one saved in SAELens's format
(``from_pretrained_path``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lenslab_workspace.train.config import TINY_RANDOM_MODEL, RunSettings
from lenslab_workspace.train.data import ByteTokenizer
from lenslab_workspace.train.errors import RunConfigError


def seed_everything(seed: int) -> None:
    """Python's, numpy's and torch's RNGs, as SAELens seeds them before making the model."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_language_model(settings: RunSettings, device: str) -> tuple[Any, Any, str]:
    """Return ``(model, tokenizer, tokenizer_name)``; the model is in eval mode on ``device``."""
    runner = settings.runner_fields
    model_name = runner.get("model_name", "gelu-2l")
    if model_name == TINY_RANDOM_MODEL:
        return _tiny_random_model(settings, device)

    from sae_lens.load_model import load_model

    try:
        model = load_model(
            runner.get("model_class_name", "HookedTransformer"),
            model_name,
            device=device,
            model_from_pretrained_kwargs=runner.get("model_from_pretrained_kwargs"),
            hook_names=[runner.get("hook_name", "blocks.0.hook_mlp_out")],
        )
    except Exception as exc:  # hub, network and unknown-name errors all mean: cannot load it
        raise RunConfigError(
            f"{settings.source}: field 'model_name': cannot load {model_name!r}: {' '.join(str(exc).split())[:300]}"
        ) from exc
    model.eval()
    tokenizer = getattr(model, "tokenizer", None)
    if runner.get("use_chat_formatting") and getattr(tokenizer, "chat_template", None) is None:
        raise RunConfigError(
            f"{settings.source}: field 'use_chat_formatting': {model_name}'s tokenizer has no chat template; "
            "set it to false, or use a model whose tokenizer has one"
        )
    return model, tokenizer, getattr(tokenizer, "name_or_path", model_name)


def _tiny_random_model(settings: RunSettings, device: str) -> tuple[Any, Any, str]:
    """lenslab's offline model: random weights seeded by ``[tiny_random] seed`` (the run's
    ``seed`` unless given), UTF-8 bytes as tokens."""
    runner = settings.runner_fields
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    tiny = settings.tiny_random
    assert tiny is not None  # filled in by load_run_file for this model name
    context_size = runner.get("context_size", 128)
    if context_size > tiny.n_ctx:
        raise RunConfigError(
            f"{settings.source}: field 'context_size': {context_size} exceeds tiny_random.n_ctx ({tiny.n_ctx}); "
            "lower context_size or raise tiny_random.n_ctx"
        )
    try:
        model = HookedTransformer(
            HookedTransformerConfig(
                n_layers=tiny.n_layers,
                d_model=tiny.d_model,
                n_heads=tiny.n_heads,
                d_head=tiny.d_head,
                d_mlp=tiny.d_mlp,
                d_vocab=tiny.d_vocab,
                n_ctx=tiny.n_ctx,
                act_fn=tiny.act_fn,
                normalization_type=tiny.normalization_type,
                seed=tiny.seed,
                device=device,
            )
        )
    except Exception as exc:  # TransformerLens checks its config with asserts and ValueErrors
        raise RunConfigError(
            f"{settings.source}: [tiny_random]: TransformerLens refuses it: {' '.join(str(exc).split())[:200]}"
        ) from exc
    model.eval()
    return model, ByteTokenizer(tiny.d_vocab), f"bytes-{tiny.d_vocab}"


def check_pretrained(settings: RunSettings) -> None:
    """Before anything is written: ``from_pretrained_path`` holds a saved SAE (SAELens's
    ``cfg.json`` + ``sae_weights.safetensors``) of ``[sae]``'s architecture and widths. A
    different one is refused: the run file would say one SAE and train another."""
    path = settings.runner_fields.get("from_pretrained_path")
    if path is None:
        return
    where = f"{settings.source}: field 'from_pretrained_path'"
    folder = Path(path)
    if not (folder / "cfg.json").is_file() or not (folder / "sae_weights.safetensors").is_file():
        raise RunConfigError(
            f"{where}: {path} is not a saved SAE (cfg.json and sae_weights.safetensors); "
            "point it at a directory written by SAE.save_model, e.g. a finished run's final/"
        )
    try:
        saved = json.loads((folder / "cfg.json").read_text(encoding="utf-8"))
        found = (saved.get("architecture", "standard"), saved["d_in"], saved["d_sae"])
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        raise RunConfigError(f"{where}: {folder / 'cfg.json'} is not a SAELens SAE config ({exc!r})") from exc
    wanted = (settings.architecture, settings.sae_fields["d_in"], settings.sae_fields["d_sae"])
    if found != wanted:
        raise RunConfigError(
            f"{where}: the SAE in {path} is {found[0]} with d_in = {found[1]}, d_sae = {found[2]}, but [sae] says "
            f"{wanted[0]} with d_in = {wanted[1]}, d_sae = {wanted[2]}; make [sae] match it"
        )


def make_training_sae(settings: RunSettings, cfg: Any) -> Any:
    """The SAE to train: new from ``[sae]``, or, with ``from_pretrained_path``, the SAE saved
    there (checked by ``check_pretrained``), loaded as SAELens's runner loads it. Its weights
    come from safetensors, which holds tensors only: loading runs no code."""
    from sae_lens.saes.sae import TrainingSAE, TrainingSAEConfig

    path = settings.runner_fields.get("from_pretrained_path")
    if path is None:
        return TrainingSAE.from_dict(TrainingSAEConfig.from_dict(cfg.get_training_sae_cfg_dict()).to_dict())
    check_pretrained(settings)  # again: the files may have changed since the launch began
    try:
        return TrainingSAE.load_from_disk(path, cfg.device)
    except Exception as exc:  # a damaged or foreign file: one line, not SAELens's traceback
        raise RunConfigError(
            f"{settings.source}: field 'from_pretrained_path': cannot load the SAE in {path}: "
            f"{' '.join(str(exc).split())[:300]}"
        ) from exc
