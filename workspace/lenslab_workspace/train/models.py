"""The language model whose activations the SAE learns: a TransformerLens model by name, or
``tiny-random`` for offline use (tests, the quick start, a laptop without a GPU)."""

from __future__ import annotations

from typing import Any

from lenslab_workspace.train.config import TINY_RANDOM_MODEL, RunSettings
from lenslab_workspace.train.data import ByteTokenizer
from lenslab_workspace.train.errors import RunConfigError


def load_language_model(settings: RunSettings, device: str) -> tuple[Any, Any, str]:
    """Return ``(model, tokenizer, tokenizer_name)``; the model is in eval mode on ``device``."""
    runner = settings.runner_fields
    model_name = runner.get("model_name", "gelu-2l")
    if model_name == TINY_RANDOM_MODEL:
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
    return model, tokenizer, getattr(tokenizer, "name_or_path", model_name)
