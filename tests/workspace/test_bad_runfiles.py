"""A corpus of broken run files and launches: each is one line on stderr naming the file and
field (or --runs-dir), the documented exit code, no traceback, and an existing run left
byte-identical. Most are refused while the run file is read; the rest once the tiny model is
built (hook, width, heads, device) or the dataset is read (row types, empty data).

lenslab-train runs in this process (``main(argv)``), so the whole corpus takes seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from .conftest import CORPUS, REPO, train_command, train_in_process, tree_digest

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

TINY = REPO / "workspace" / "configs" / "tiny.toml"
DELETE = object()
ERROR = "lenslab-train: error: "


@dataclass(frozen=True)
class Case:
    id: str
    changes: dict[str, Any] = field(default_factory=dict)  # dotted keys into tiny.toml
    expect: str = ""  # what the one line must name besides the run file
    code: int = 2
    text: str | bytes | None = None  # the run file's raw content instead of changes
    dataset: str | None = None  # a .jsonl dataset's content, used as dataset_path
    runs_dir: Callable[[Path], Path] | None = None  # makes a broken --runs-dir
    names_file: bool = True


def base() -> dict[str, Any]:
    data = tomllib.loads(TINY.read_text())
    data["dataset_path"] = str(CORPUS)
    data["name"] = "bad"
    return data


def apply(tree: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        if value is DELETE:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return tree


def a_file(tmp: Path) -> Path:
    (tmp / "runs-file").write_text("x")
    return tmp / "runs-file"


def under_a_file(tmp: Path) -> Path:
    (tmp / "plain").write_text("x")
    return tmp / "plain" / "runs"


def run_is_a_file(tmp: Path) -> Path:
    (tmp / "rd").mkdir()
    (tmp / "rd" / "bad").write_text("not a run")
    return tmp / "rd"


ROWS_TEXT = '{"text": "some text long enough"}\n'

CASES = [
    # --- the file itself
    Case("toml-syntax", text="name = [\n", expect="not valid TOML"),
    Case("not-utf8", text=b"name = '\xff\xfe'\n", expect="cannot read the run file"),
    Case("empty-file", text="", expect="'name'"),
    Case("duplicate-key", text='name = "a"\nname = "b"\n', expect="not valid TOML"),
    Case("only-comment", text="# nothing\n", expect="'name'"),
    # --- name
    Case("name-dotdot", {"name": "../up"}, "'name'"),
    Case("name-slash", {"name": "a/b"}, "'name'"),
    Case("name-empty", {"name": ""}, "'name'"),
    Case("name-dash", {"name": "-x"}, "'name'"),
    Case("name-too-long", {"name": "x" * 65}, "'name'"),
    Case("name-int", {"name": 5}, "'name'"),
    Case("name-space", {"name": "a b"}, "'name'"),
    Case("name-hidden", {"name": ".hidden"}, "'name'"),
    Case("name-newline", {"name": "a\nb"}, "'name'"),
    # --- SAELens runner fields, parsed strictly
    Case("tokens-string", {"training_tokens": "5"}, "'training_tokens'"),
    Case("tokens-float", {"training_tokens": 1.5e6}, "'training_tokens'"),
    Case("tokens-zero", {"training_tokens": 0}, "'training_tokens'"),
    Case("tokens-negative", {"training_tokens": -10}, "'training_tokens'"),
    Case("context-zero", {"context_size": 0}, "'context_size'"),
    Case("context-string", {"context_size": "64"}, "'context_size'"),
    Case("lr-zero", {"lr": 0.0}, "'lr'"),
    Case("lr-negative", {"lr": -1e-3}, "'lr'"),
    Case("lr-word", {"lr": "fast"}, "'lr'"),
    Case("lr-inf", {"lr": float("inf")}, "'lr': must be a finite number"),
    Case("lr-nan", {"lr": float("nan")}, "'lr': must be a finite number"),
    Case("mixing-minus-inf", {"activations_mixing_fraction": float("-inf")}, "'activations_mixing_fraction'"),
    Case("l1-inf", {"sae.architecture": "standard", "sae.l1_coefficient": float("inf")}, "'sae.l1_coefficient'"),
    Case("every-seconds-inf", {"resilience.checkpoint_every_seconds": float("inf")}, "'resilience.checkpoint_every"),
    Case("retry-nan", {"resilience.mirror_retry_seconds": float("nan")}, "'resilience.mirror_retry_seconds'"),
    Case("batch-tokens-zero", {"train_batch_size_tokens": 0}, "'train_batch_size_tokens'"),
    Case("store-batch-zero", {"store_batch_size_prompts": 0}, "'store_batch_size_prompts'"),
    Case("buffer-zero", {"n_batches_in_buffer": 0}, "'n_batches_in_buffer'"),
    Case("streaming-no", {"streaming": "no"}, "'streaming'"),
    Case("tokenized-no", {"is_dataset_tokenized": "no"}, "'is_dataset_tokenized'"),
    Case("tokenized-int", {"is_dataset_tokenized": 1}, "'is_dataset_tokenized'"),
    Case("seed-string", {"seed": "42"}, "'seed'"),
    Case("seed-bool", {"seed": True}, "'seed'"),
    Case("device-int", {"device": 0}, "'device'"),
    Case("warmup-negative", {"lr_warm_up_steps": -1}, "'lr_warm_up_steps'"),
    Case("mixing-above-one", {"activations_mixing_fraction": 1.5}, "'activations_mixing_fraction'"),
    Case("typo-field", {"contex_size": 64}, "'contex_size'"),
    Case("unknown-field", {"foo": 1}, "'foo'"),
    Case("prefetch-negative", {"prefetch_llm_batches": -1}, "prefetch_llm_batches must be a bool or a non-negative"),
    Case("cached-activations", {"use_cached_activations": True}, "'use_cached_activations'"),
    Case("wandb-optimizer", {"logger.log_optimizer_state_to_wandb": True}, "'logger.log_optimizer_state_to_wandb'"),
    Case("wandb-frequency-zero", {"logger.wandb_log_frequency": 0}, "'logger.wandb_log_frequency'"),
    Case("logger-not-table", {"logger": "x"}, "'logger'"),
    Case("dataset-missing", {"dataset_path": DELETE}, "'dataset_path'"),
    Case("dataset-empty-string", {"dataset_path": ""}, "'dataset_path'"),
    Case("dataset-no-such-file", {"dataset_path": "/nonexistent/corpus.jsonl"}, "'dataset_path'"),
    Case("dataset-relative-missing", {"dataset_path": "data/missing.jsonl"}, "'dataset_path'"),
    Case("seqpos-string", {"seqpos_slice": "1:2"}, "'seqpos_slice'"),
    Case("head-index-string", {"hook_head_index": "0"}, "'hook_head_index'"),
    # --- [sae]
    Case("d-in-word", {"sae.d_in": "wide"}, "'sae.d_in'"),
    Case("d-in-zero", {"sae.d_in": 0}, "'sae.d_in'"),
    Case("d-sae-negative", {"sae.d_sae": -5}, "'sae.d_sae'"),
    Case("d-sae-missing", {"sae.d_sae": DELETE}, "'sae.d_sae'"),
    Case("k-zero", {"sae.k": 0}, "'sae.k'"),
    Case("k-above-d-sae", {"sae.k": 1000}, "'sae.k'"),
    Case("k-string", {"sae.k": "16"}, "'sae.k'"),
    Case("batchtopk-k-above", {"sae.architecture": "batchtopk", "sae.k": 513}, "'sae.k'"),
    Case("architecture-unknown", {"sae.architecture": "dense"}, "'sae.architecture'"),
    Case("sae-typo", {"sae.kk": 3}, "'sae.kk'"),
    Case("normalize-unknown", {"sae.normalize_activations": "sometimes"}, "'sae.normalize_activations'"),
    Case("sae-not-table", {"sae": 5}, "'sae'"),
    Case("sae-bool-string", {"sae.apply_b_dec_to_input": "yes"}, "'sae.apply_b_dec_to_input'"),
    # --- [resilience]
    Case("keep-last-zero", {"resilience.keep_last": 0}, "'resilience.keep_last'"),
    Case("exact-no", {"resilience.exact": "no"}, "'resilience.exact'"),
    Case(
        "every-seconds-string", {"resilience.checkpoint_every_seconds": "10"}, "'resilience.checkpoint_every_seconds'"
    ),
    Case("every-seconds-zero", {"resilience.checkpoint_every_seconds": 0}, "'resilience.checkpoint_every_seconds'"),
    Case("mirror-relative", {"resilience.mirror": "relative/dir"}, "'resilience.mirror'"),
    Case("mirror-bare-name", {"resilience.mirror": "bucket-name"}, "'resilience.mirror'"),
    Case("mirror-int", {"resilience.mirror": 5}, "'resilience.mirror'"),
    Case("mirror-space", {"resilience.mirror": "s3://a b"}, "'resilience.mirror'"),
    Case("mirror-newline", {"resilience.mirror": "/tmp/m\nx"}, "'resilience.mirror'"),
    Case("resilience-unknown", {"resilience.unknown": 1}, "'resilience.unknown'"),
    Case("mirror-failures-zero", {"resilience.mirror_max_consecutive_failures": 0}, "mirror_max_consecutive"),
    Case("status-every-negative", {"resilience.status_every_seconds": -1}, "'resilience.status_every_seconds'"),
    Case("mirror-unknown-scheme", {"resilience.mirror": "nosuch://bucket/x"}, "nosuch://", 1, names_file=False),
    # --- [tiny_random]
    Case("vocab-small", {"tiny_random.d_vocab": 100}, "'tiny_random.d_vocab'"),
    Case("layers-string", {"tiny_random.n_layers": "2"}, "'tiny_random.n_layers'"),
    Case("tiny-unknown", {"tiny_random.bogus": 1}, "'tiny_random.bogus'"),
    # --- known only once the model is built
    Case("context-above-n-ctx", {"context_size": 200}, "'context_size'"),
    Case("hook-missing", {"hook_name": "blocks.9.hook_resid_post"}, "'hook_name'"),
    Case("hook-typo", {"hook_name": "blocks.0.hook_resid_pots"}, "did you mean 'blocks.0.hook_resid_post'"),
    Case("d-in-mismatch", {"sae.d_in": 32}, "set sae.d_in = 64"),
    Case("head-index-range", {"hook_name": "blocks.0.attn.hook_z", "hook_head_index": 9}, "'hook_head_index'"),
    Case("head-index-no-heads", {"hook_head_index": 0}, "'hook_head_index'"),
    Case("act-fn-unknown", {"tiny_random.act_fn": "nope"}, "[tiny_random]"),
    Case("device-cuda", {"device": "cuda"}, "'device'"),
    Case("device-cuda-7", {"device": "cuda:7"}, "'device'"),
    Case("device-tpu", {"device": "tpu"}, "'device'"),
    Case("llm-device-cuda", {"llm_device": "cuda"}, "'llm_device'"),
    # --- the data, read after the model is built
    Case("rows-int", dataset='{"text": 5}\n' * 3, expect="row 0 is a number, not text", names_file=False),
    Case("rows-null", dataset=ROWS_TEXT + '{"text": null}\n', expect="row 1 is empty", names_file=False),
    Case("rows-none", dataset="", expect="the file is empty (0 bytes)", names_file=False),
    Case("rows-too-short", dataset=ROWS_TEXT, expect="empty: it yields no complete sequence", names_file=False),
    Case("rows-no-text-column", dataset='{"foo": "bar"}\n', expect="no token or text column", names_file=False),
    Case("rows-not-json", dataset="this is not json\n", expect="cannot load it: JSON parse error", names_file=False),
    Case("rows-blank-lines", dataset="\n\n\n", expect="dataset_path", names_file=False),
    Case(
        "rows-tokens-strings",
        {"is_dataset_tokenized": True},
        dataset='{"tokens": ["a", "b"]}\n',
        expect="row 0 is a list, not a list of token ids",
        names_file=False,
    ),
    # --- the runs directory
    Case("runs-dir-file", runs_dir=a_file, expect="--runs-dir", names_file=False),
    Case("runs-dir-under-file", runs_dir=under_a_file, expect="--runs-dir", names_file=False),
    Case("run-dir-is-file", runs_dir=run_is_a_file, expect="--runs-dir", names_file=False),
    # --- an existing run's name with another config: refused, the run untouched
    Case("existing-run-other-config", {"name": "t"}, "was started with another config", names_file=False),
]


def assert_one_line(err: str, *needles: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(ERROR), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0][len(ERROR) :]


def test_corpus_is_large_and_names_are_unique() -> None:
    assert len(CASES) >= 60
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_broken_run_file(
    case: Case, tmp_path: Path, existing_run: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    runs, _ = existing_run
    before = tree_digest(runs)  # the existing run 't' (and nothing else)
    run_file = tmp_path / "run.toml"
    if case.text is not None:
        run_file.write_bytes(case.text.encode() if isinstance(case.text, str) else case.text)
    else:
        tree = apply(base(), case.changes)
        if case.dataset is not None:
            (tmp_path / "data.jsonl").write_text(case.dataset)
            tree["dataset_path"] = str(tmp_path / "data.jsonl")
        run_file.write_text(tomli_w.dumps(tree))
    runs_arg = case.runs_dir(tmp_path) if case.runs_dir is not None else runs

    code, err = train_in_process([str(run_file), "--runs-dir", str(runs_arg)], capsys)

    assert code == case.code, err
    message = assert_one_line(err, case.expect, *([str(run_file)] if case.names_file else []))
    assert {k: v for k, v in tree_digest(runs).items() if k.split("/")[0] != "bad"} == before
    assert message
    # A new run refused at any point, even once the model was built or the data read, leaves
    # no run directory behind.
    assert not (runs / "bad").exists()
    if case.runs_dir is not None:
        assert not (runs_arg / "bad").is_dir()


@pytest.mark.parametrize(
    ("changes", "dataset", "expect"),
    [
        ({"hook_name": "blocks.0.hook_resid_pots"}, None, "did you mean"),
        ({}, '{"text": 5}\n' * 3, "row 0 is a number, not text"),
    ],
    ids=["hook-typo", "rows-int"],
)
def test_refused_launch_of_an_existing_run_dir_records_it_and_writes_nothing_else(
    changes: dict[str, Any], dataset: str | None, expect: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run directory that was there before (an earlier launch that never committed a
    checkpoint) keeps its log, appended, and says failed; nothing half-made is added."""
    made = tmp_path / "runs" / "bad"
    made.mkdir(parents=True)
    (made / "train.log").write_text("an earlier launch\n")
    tree = apply(base(), changes)
    if dataset is not None:
        (tmp_path / "data.jsonl").write_text(dataset)
        tree["dataset_path"] = str(tmp_path / "data.jsonl")
    run_file = tmp_path / "run.toml"
    run_file.write_text(tomli_w.dumps(tree))

    code, err = train_in_process([str(run_file), "--runs-dir", str(tmp_path / "runs")], capsys)

    assert code == 2, err
    message = assert_one_line(err, expect)
    assert {p.name for p in made.iterdir()} == {"status.json", "train.log"}
    log = (made / "train.log").read_text()
    assert log.startswith("an earlier launch\n") and len(log.splitlines()) > 1
    status = json.loads((made / "status.json").read_text())
    assert (status["state"], status["message"]) == ("failed", message)


@pytest.mark.slow  # a fresh interpreter importing torch and sae-lens
def test_unloadable_dataset_is_one_line_with_the_reason_in_a_new_process(tmp_path: Path) -> None:
    """datasets logs a failed load itself; a fresh process (whose stderr that logger holds)
    shows that only lenslab's line is printed, and that it gives the parser's reason."""
    (tmp_path / "data.jsonl").write_text("this is not json\n")
    tree = base()
    tree["dataset_path"] = str(tmp_path / "data.jsonl")
    run_file = tmp_path / "run.toml"
    run_file.write_text(tomli_w.dumps(tree))
    # Not inherited from this test process, where an in-process launch may have set it.
    env = {k: v for k, v in os.environ.items() if k != "DATASETS_VERBOSITY"}
    result = subprocess.run(
        train_command(run_file, tmp_path / "runs"), capture_output=True, text=True, timeout=300, env=env, check=False
    )
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(ERROR) and "cannot load it: JSON parse error" in lines[0], lines[0]
    assert not (tmp_path / "runs" / "bad").exists()


def test_missing_run_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = train_in_process([str(tmp_path / "nope.toml"), "--runs-dir", str(tmp_path / "runs")], capsys)
    assert code == 2
    assert_one_line(err, str(tmp_path / "nope.toml"), "no such run file")
    assert not (tmp_path / "runs").exists()


def test_run_file_is_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = train_in_process([str(tmp_path), "--runs-dir", str(tmp_path / "runs")], capsys)
    assert code == 2
    assert_one_line(err, str(tmp_path), "cannot read the run file")


@pytest.mark.parametrize(
    ("content", "expect"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "not a lenslab run config"),
        (b'{"runner": 5}', "not a lenslab run config"),
        (b"\xff\xfe\x00", "cannot read it"),
    ],
    ids=["not-json", "a-list", "runner-not-table", "not-utf8"],
)
def test_corrupt_run_config_is_one_line_and_the_run_is_untouched(
    content: bytes, expect: str, tmp_path: Path, existing_run: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    runs, run_file = existing_run
    copy = tmp_path / "runs"
    shutil.copytree(runs, copy)
    (copy / "t" / "final" / "lenslab-finished.json").unlink()  # not finished: the launch would resume
    (copy / "t" / "run-config.json").write_bytes(content)
    before = tree_digest(copy)
    code, err = train_in_process([str(run_file), "--runs-dir", str(copy)], capsys)
    assert code == 2
    assert_one_line(err, str(copy / "t" / "run-config.json"), expect, "--fresh")
    assert tree_digest(copy) == before


def test_unexpected_error_is_one_line_naming_its_log(
    tmp_path: Path, existing_run: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """A damaged status.json that is a directory makes the launch fail in a way nobody
    planned: one line, the traceback in a crash log inside the run, status unchanged there."""
    runs, run_file = existing_run
    copy = tmp_path / "runs"
    shutil.copytree(runs, copy)
    (copy / "t" / "final" / "lenslab-finished.json").unlink()
    (copy / "t" / "train.log").unlink()
    (copy / "t" / "train.log").mkdir()  # logging cannot open it
    code, err = train_in_process([str(run_file), "--runs-dir", str(copy)], capsys)
    assert code == 1
    line = assert_one_line(err, "unexpected IsADirectoryError", "traceback in")
    crash = Path(line.rsplit("traceback in ", 1)[1].rstrip(")"))
    assert crash.is_file() and "Traceback" in crash.read_text()


def unfinished_copy(runs: Path, tmp_path: Path) -> Path:
    """A copy of the existing run that a launch would resume (not marked finished)."""
    copy = tmp_path / "runs"
    shutil.copytree(runs, copy)
    (copy / "t" / "final" / "lenslab-finished.json").unlink()
    return copy


def test_fresh_that_fails_to_build_leaves_the_old_run_in_place(
    tmp_path: Path, existing_run: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    runs, run_file = existing_run
    copy = unfinished_copy(runs, tmp_path)
    before = tree_digest(copy)
    broken = tmp_path / "broken.toml"
    broken.write_text(run_file.read_text().replace("blocks.0.hook_resid_post", "blocks.0.hook_resid_pots"))
    code, err = train_in_process([str(broken), "--runs-dir", str(copy), "--fresh"], capsys)
    assert code == 2
    assert_one_line(err, str(broken), "'hook_name'")
    assert tree_digest(copy) == before  # no staging directory left, the old run not moved aside


def test_unexpected_failure_after_start_marks_status_failed_with_a_crash_log(
    tmp_path: Path, existing_run: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    runs, run_file = existing_run
    copy = unfinished_copy(runs, tmp_path)
    for tokens in (copy / "t" / "data").glob("tokens-*.npy"):
        tokens.write_bytes(b"not an array")  # damaged behind lenslab's back
    code, err = train_in_process([str(run_file), "--runs-dir", str(copy)], capsys)
    assert code == 1
    line = assert_one_line(err, "unexpected ", "traceback in")
    crash = Path(line.rsplit("traceback in ", 1)[1].rstrip(")"))
    assert crash.parent == copy / "t" and "Traceback" in crash.read_text()
    status = json.loads((copy / "t" / "status.json").read_text())
    assert (status["state"], status["message"]) == ("failed", line)
