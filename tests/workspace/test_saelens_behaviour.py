"""SAELens fields that lenslab honours, checked by what they do (not only that they load)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lenslab_workspace.train.config import load_run_file
from lenslab_workspace.train.errors import RunConfigError

from .conftest import (
    CORPUS,
    SMALL_RUN,
    assert_bit_identical,
    final_weights,
    merge,
    run_train,
    train_in_process,
    write_run_file,
)


@pytest.mark.slow
def test_exact_makes_matching_pursuit_bit_identical_on_the_cpu(tmp_path: Path) -> None:
    """matching_pursuit's backward pass differs between two CPU runs unless deterministic
    algorithms are on; ``exact = true`` turns them on on every device."""
    import tomli_w

    run = merge({k: v for k, v in SMALL_RUN.items() if k != "sae"}, {"training_tokens": 30_000})
    run["sae"] = {"architecture": "matching_pursuit", "d_in": 32, "d_sae": 128}
    run["resilience"]["exact"] = True
    run_file = tmp_path / "run.toml"
    run_file.write_text(tomli_w.dumps(run))
    finals = []
    for attempt in ("a", "b"):
        result = run_train(run_file, tmp_path / attempt)
        assert result.returncode == 0, result.stderr
        finals.append(final_weights(tmp_path / attempt / "t"))
    assert_bit_identical(finals[0], finals[1])


@pytest.mark.slow
def test_a_text_dataset_without_is_dataset_tokenized_trains(tmp_path: Path) -> None:
    """SAELens 6.54 tells text from tokens by the columns; so does lenslab."""
    import tomli_w

    run = merge(SMALL_RUN, {"training_tokens": 10_240})
    del run["is_dataset_tokenized"]
    run_file = tmp_path / "run.toml"
    run_file.write_text(tomli_w.dumps(run))
    result = run_train(run_file, tmp_path / "runs")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "runs" / "t" / "final" / "sae_weights.safetensors").is_file()


def test_the_columns_decide_text_or_tokens_like_saelens(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from lenslab_workspace.train.dataset import ByteTokenizer, iterate_sequences

    text = tmp_path / "text.jsonl"
    text.write_text("".join(CORPUS.read_text().splitlines(keepends=True)[:50]))
    tokens = tmp_path / "tokens.jsonl"
    tokens.write_text("".join(json.dumps({"input_ids": list(range(i, i + 10))}) + "\n" for i in range(5)))
    # The field says the opposite of each file's column: the column wins, with a warning.
    with caplog.at_level(logging.WARNING, logger="lenslab.train"):
        as_text = next(
            iterate_sequences(
                {"dataset_path": str(text), "context_size": 8, "is_dataset_tokenized": True}, None, ByteTokenizer(257)
            )
        )
        as_tokens = list(
            iterate_sequences(
                {"dataset_path": str(tokens), "context_size": 8, "is_dataset_tokenized": False}, None, None
            )
        )
    assert as_text[0].item() == 256 and as_text.shape == (8,)  # BOS, then UTF-8 bytes
    assert [row.tolist() for row in as_tokens] == [list(range(i, i + 8)) for i in range(5)]
    assert sum("the column decides" in r.getMessage() for r in caplog.records) == 2


@pytest.mark.slow  # real processes, seconds each: kept out of the fast lane
def test_from_pretrained_path_continues_a_saved_sae(
    tmp_path: Path, existing_run: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors.torch import load_file

    from lenslab_workspace.train.models import make_training_sae

    runs, _ = existing_run
    saved = runs / "t" / "final"
    settings = load_run_file(write_run_file(tmp_path / "run.toml", {"from_pretrained_path": str(saved)}))
    sae = make_training_sae(settings, settings.runner_config())
    for key, tensor in load_file(str(saved / "sae_weights.safetensors")).items():
        assert torch.equal(getattr(sae, key).detach(), tensor), key
    # ... and a whole run trains on from it, finishing where a fresh run would not.
    run_file = write_run_file(tmp_path / "run.toml", {"from_pretrained_path": str(saved), "training_tokens": 10_240})
    code, err = train_in_process([str(run_file), "--runs-dir", str(tmp_path / "runs")], capsys)
    assert code == 0, err
    fresh = write_run_file(tmp_path / "fresh.toml", {"training_tokens": 10_240})
    code, err = train_in_process([str(fresh), "--runs-dir", str(tmp_path / "fresh")], capsys)
    assert code == 0, err
    continued, scratch = final_weights(tmp_path / "runs" / "t"), final_weights(tmp_path / "fresh" / "t")
    assert not torch.equal(continued["W_dec"], scratch["W_dec"])


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"sae": {"d_sae": 96}}, "but [sae] says topk with d_in = 32, d_sae = 96; make [sae] match it"),
        ({"from_pretrained_path": "/nonexistent/final"}, "is not a saved SAE"),
    ],
)
def test_from_pretrained_path_that_does_not_fit_is_one_line(
    tmp_path: Path,
    existing_run: tuple[Path, Path],
    changes: dict[str, Any],
    expected: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    runs, _ = existing_run
    run_file = write_run_file(tmp_path / "run.toml", {"from_pretrained_path": str(runs / "t" / "final"), **changes})
    code, err = train_in_process([str(run_file), "--runs-dir", str(tmp_path / "runs")], capsys)
    assert code == 2
    assert err.count("\n") == 1 and "field 'from_pretrained_path'" in err and expected in err, err
    assert not (tmp_path / "runs" / "t").exists()  # a refused new run leaves nothing behind


def chat_model(tmp_path: Path) -> Any:
    """A tiny random model with a real (offline) Hugging Face tokenizer that has a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    words = ["<bos>", "<eos>", "<unk>", "<|user|>", "<|assistant|>", "hello", "there", "how", "are", "you", "fine"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")
    fast.chat_template = "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <eos> {% endfor %}"
    fast.save_pretrained(tmp_path / "tokenizer")
    config = HookedTransformerConfig(
        n_layers=1, d_model=16, n_heads=2, d_head=8, d_mlp=32, d_vocab=len(words), n_ctx=32, act_fn="gelu", seed=0
    )
    return HookedTransformer(config, tokenizer=AutoTokenizer.from_pretrained(tmp_path / "tokenizer"))


@pytest.mark.parametrize("column", ["messages", "text"])
def test_use_chat_formatting_tokenizes_like_saelens(tmp_path: Path, column: str) -> None:
    from datasets import Dataset
    from sae_lens import LanguageModelSAERunnerConfig, StandardTrainingSAEConfig
    from sae_lens.training.activations_store import ActivationsStore

    from lenslab_workspace.train.dataset import iterate_sequences

    model = chat_model(tmp_path)
    said = ["hello there", "how are you", "fine", "hello", "you are fine there"] * 4
    rows = [
        {
            column: [{"role": "user", "content": s}, {"role": "assistant", "content": "fine"}]
            if column == "messages"
            else s
        }
        for s in said
    ]
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    fields = {"dataset_path": str(path), "context_size": 8, "use_chat_formatting": True, "is_dataset_tokenized": False}
    ours = [seq.tolist() for seq in iterate_sequences(fields, model, model.tokenizer)]
    saelens_fields = {k: v for k, v in fields.items() if k != "dataset_path"}
    cfg = LanguageModelSAERunnerConfig(
        sae=StandardTrainingSAEConfig(d_in=16, d_sae=32), model_name="x", hook_name="blocks.0.hook_resid_post",
        dataset_path=str(path), streaming=False, checkpoint_path=None, output_path=None, **saelens_fields,
    )  # fmt: skip
    store = ActivationsStore.from_config(model, cfg, override_dataset=Dataset.from_list(rows))
    theirs = [seq.tolist() for seq in store.iterable_sequences]
    assert ours == theirs and len(ours) > 3
    assert ours[0][:2] == [0, 3]  # BOS, then the template's <|user|>


def test_use_chat_formatting_on_tiny_random_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(RunConfigError) as info:
        load_run_file(write_run_file(tmp_path / "run.toml", {"use_chat_formatting": True}))
    assert "field 'use_chat_formatting': the tiny-random model has no chat template" in str(info.value)


@pytest.mark.slow
def test_exclude_special_tokens_reads_new_rows_instead_of_reusing_early_ones(tmp_path: Path) -> None:
    """Dropped positions do not count toward the token budget: more rows are stored, and the
    stream never wraps to the corpus's first rows (SAELens would read new rows there)."""
    # space, 'e', 't': about a third of the corpus's bytes
    # A buffer of 32 sequences: little slack beyond the budget, as in a long run.
    changes = {"exclude_special_tokens": [32, 101, 116], "training_tokens": 60_000, "n_batches_in_buffer": 32}
    run_file = write_run_file(tmp_path / "run.toml", changes)
    result = run_train(run_file, tmp_path / "runs")
    assert result.returncode == 0, result.stderr
    log = (tmp_path / "runs" / "t" / "train.log").read_text()
    assert "all sequences of the dataset have been used" not in log
    (array,) = (tmp_path / "runs" / "t" / "data").glob("tokens-*.npy")
    rows = torch.from_numpy(np.load(array).astype(np.int64))
    assert (~torch.isin(rows, torch.tensor([32, 101, 116]))).sum() >= 60_000


def test_seed_seeds_the_tiny_random_model(tmp_path: Path) -> None:
    from lenslab_workspace.train.models import load_language_model

    def weights(changes: dict[str, Any]) -> torch.Tensor:
        settings = load_run_file(write_run_file(tmp_path / "run.toml", changes))
        model, _, _ = load_language_model(settings, "cpu")
        return model.W_E.detach().clone()

    assert not torch.equal(weights({"seed": 1}), weights({"seed": 2}))
    assert torch.equal(weights({"seed": 3}), weights({"seed": 3}))
    pinned = {"tiny_random": {"seed": 5}}
    assert torch.equal(weights({"seed": 1, **pinned}), weights({"seed": 2, **pinned}))
