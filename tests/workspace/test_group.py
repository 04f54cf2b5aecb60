"""Several SAEs from one model pass: the same SAEs as trained one by one, and bad input refused."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from lenslab.contract import EXIT_INTERRUPTED

from .conftest import (
    CORPUS,
    SMALL_RUN,
    assert_bit_identical,
    kill,
    merge,
    read_status,
    start_train,
    train_in_process,
    wait_for_step,
)

# Two hooks; widths and architectures that draw different amounts of randomness when made
# (so their mixing differs alone); one SAE without the norm estimate (its stream starts
# earlier); two that differ only in sparsity and lr (they share a mixing stream).
GROUP_SAES: list[dict[str, Any]] = [
    {"name": "k8", "architecture": "topk", "d_in": 32, "d_sae": 128, "k": 8},
    {"name": "k4-fast", "architecture": "topk", "d_in": 32, "d_sae": 128, "k": 4, "lr": 1e-3},
    {
        "name": "relu-mlp",
        "architecture": "standard",
        "d_in": 32,
        "d_sae": 64,
        "l1_coefficient": 2.0,
        "hook_name": "blocks.0.hook_mlp_out",
        "normalize_activations": "none",
    },
    {"name": "jump-mlp", "architecture": "jumprelu", "d_in": 32, "d_sae": 96, "hook_name": "blocks.0.hook_mlp_out"},
]
SHORT = {"training_tokens": 30_720, "resilience": {"checkpoint_every_tokens": 10_240}}


def group_run(name: str = "g", saes: list[dict[str, Any]] | None = None, **changes: Any) -> dict[str, Any]:
    """A group run file: ``[sae]`` of the small run as defaults, one ``[[saes]]`` per SAE."""
    run = merge(SMALL_RUN, {"name": name, **SHORT, **changes})
    run["sae"] = {"normalize_activations": "expected_average_only_in"}
    run["saes"] = saes if saes is not None else GROUP_SAES
    return run


def alone_run(entry: dict[str, Any]) -> dict[str, Any]:
    """The run file that trains one SAE of the group by itself."""
    entry = dict(entry)
    name = entry.pop("name")
    per_sae: dict[str, Any] = {k: entry.pop(k) for k in ("lr", "hook_name", "from_pretrained_path") if k in entry}
    run = merge(SMALL_RUN, {"name": name, **SHORT, **per_sae})
    run["sae"] = {"normalize_activations": "expected_average_only_in", **entry}
    return run


def weights(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(folder / "sae_weights.safetensors"))


@pytest.mark.slow
def test_group_equals_saes_trained_one_by_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = tmp_path / "runs"
    (tmp_path / "group.toml").write_text(tomli_w.dumps(group_run()))
    code, err = train_in_process([str(tmp_path / "group.toml"), "--runs-dir", str(runs)], capsys)
    assert code == 0, err
    status = json.loads((runs / "g" / "status.json").read_text())
    assert status["state"] == "finished" and status["tokens_done"] == 30_720
    assert [s["name"] for s in status["saes"]] == [e["name"] for e in GROUP_SAES]
    assert all(s["losses"] for s in status["saes"])
    assert_runs_table_shows_each_sae(status)
    for entry in GROUP_SAES:
        run_file = tmp_path / f"{entry['name']}.toml"
        run_file.write_text(tomli_w.dumps(alone_run(entry)))
        code, err = train_in_process([str(run_file), "--runs-dir", str(runs)], capsys)
        assert code == 0, err
        group_final = runs / "g" / "final" / entry["name"]
        assert_bit_identical(weights(group_final), weights(runs / entry["name"] / "final"))
        from sae_lens import SAE

        sae = SAE.load_from_disk(str(group_final))  # SAELens's own format
        assert sae.cfg.metadata.hook_name == entry.get("hook_name", SMALL_RUN["hook_name"])


@pytest.mark.slow  # two group runs: tens of seconds on a shared machine
def test_group_with_prefetch_equals_the_group_without(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = tmp_path / "runs"
    finals: dict[str, dict[str, Any]] = {}
    for name, prefetch in (("plain", False), ("ahead", 2)):
        (tmp_path / f"{name}.toml").write_text(tomli_w.dumps(group_run(name, prefetch_llm_batches=prefetch)))
        code, err = train_in_process([str(tmp_path / f"{name}.toml"), "--runs-dir", str(runs)], capsys)
        assert code == 0, err
        finals[name] = {e["name"]: weights(runs / name / "final" / e["name"]) for e in GROUP_SAES}
    for entry in GROUP_SAES:
        assert_bit_identical(finals["ahead"][entry["name"]], finals["plain"][entry["name"]])


def test_prefetching_streams_serve_the_same_batches_from_shared_passes(tmp_path: Path) -> None:
    """Three streams (two lane-mates on one hook, one on another hook and RNG state), with and
    without prefetch threads: the same batches, and the lane-mates still share each model pass."""
    import numpy as np
    import torch

    from lenslab_workspace.train.config import load_run_file
    from lenslab_workspace.train.group_data import GroupStream, SharedForward, cache_size
    from lenslab_workspace.train.models import load_language_model

    path = tmp_path / "run.toml"
    path.write_text(tomli_w.dumps(merge(SMALL_RUN, {"train_batch_size_tokens": 256})))
    fields = load_run_file(path).runner_fields
    model, _, _ = load_language_model(load_run_file(path), "cpu")
    tokens = np.random.default_rng(0).integers(0, 200, size=(2000, 32), dtype=np.int32)  # no epoch wrap
    hooks = ["blocks.0.hook_resid_post", "blocks.0.hook_resid_post", "blocks.0.hook_mlp_out"]
    served: dict[bool, list[list[torch.Tensor]]] = {}
    passes: dict[bool, int] = {}
    for prefetch in (False, True):
        runner = {**fields, "prefetch_llm_batches": prefetch}
        shared = SharedForward(model, hooks, runner, keep=cache_size(runner, 2))
        rngs = [torch.manual_seed(1).get_state(), torch.manual_seed(1).get_state(), torch.manual_seed(2).get_state()]
        streams = [
            GroupStream(model, tokens, {**runner, "hook_name": h}, 32, None, shared, rng)
            for h, rng in zip(hooks, rngs, strict=True)
        ]
        ahead_of_the_rest = [next(streams[2]).clone() for _ in range(5)]  # as a norm estimate reads
        served[prefetch] = [ahead_of_the_rest, *([next(s).clone() for s in streams] for _ in range(40))]
        for stream in streams:
            stream.close()
        passes[prefetch] = shared.passes
    for plain, ahead in zip(served[False], served[True], strict=True):
        assert all(torch.equal(a, b) for a, b in zip(plain, ahead, strict=True))
    assert torch.equal(served[False][1][0], served[False][1][1])  # lane-mates: the same batches
    # Two lanes (the third stream runs 5 batches ahead): each lane's passes once, plus at most
    # what the threads had made ahead when they were stopped (prefetch_depth: 2 model batches).
    assert passes[False] <= passes[True] <= passes[False] + 2 * 2


@pytest.mark.slow
def test_a_group_steps_while_its_token_file_is_still_partial(tmp_path: Path) -> None:
    corpus = tmp_path / "big.jsonl"
    # ~25 MB and a run that needs all of it: tens of seconds of tokenizing, against the seconds
    # to the first step (the test stops the run long before it would end).
    corpus.write_text(CORPUS.read_text() * 60)
    run = group_run("g", streaming=True, dataset_path=str(corpus), training_tokens=20_000_000)
    (tmp_path / "group.toml").write_text(tomli_w.dumps(run))
    runs, data = tmp_path / "runs", tmp_path / "runs" / "g" / "data"
    proc = start_train(tmp_path / "group.toml", runs)
    wait_for_step(proc, runs / "g", 1)
    # A step was taken, and shown for each SAE, while the token file is still partial.
    assert list(data.glob(".tokens-*.partial")) and not list(data.glob("tokens-*.npy"))
    status = read_status(runs / "g")
    assert status is not None and status["step"] >= 1
    assert [s["name"] for s in status["saes"]] == [e["name"] for e in GROUP_SAES]
    kill(proc, signal.SIGTERM)
    assert proc.returncode == EXIT_INTERRUPTED
    assert (read_status(runs / "g") or {}).get("state") == "interrupted"


@pytest.mark.slow
def test_an_sae_of_a_group_continues_a_saved_one_as_it_would_alone(
    tmp_path: Path, existing_run: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    saved = existing_run[0] / "t" / "final"  # topk, d_in 32, d_sae 128: the group's "k8"
    saes = [{**GROUP_SAES[0], "from_pretrained_path": str(saved)}, GROUP_SAES[2]]
    runs = tmp_path / "runs"
    (tmp_path / "group.toml").write_text(tomli_w.dumps(group_run("g", saes)))
    code, err = train_in_process([str(tmp_path / "group.toml"), "--runs-dir", str(runs)], capsys)
    assert code == 0, err
    for entry in saes:
        (tmp_path / f"{entry['name']}.toml").write_text(tomli_w.dumps(alone_run(entry)))
        code, err = train_in_process([str(tmp_path / f"{entry['name']}.toml"), "--runs-dir", str(runs)], capsys)
        assert code == 0, err
        assert_bit_identical(weights(runs / "g" / "final" / entry["name"]), weights(runs / entry["name"] / "final"))
    # The continued SAE is not the one a fresh start gives.
    (tmp_path / "fresh.toml").write_text(tomli_w.dumps(group_run("fresh", [GROUP_SAES[0], GROUP_SAES[2]])))
    code, err = train_in_process([str(tmp_path / "fresh.toml"), "--runs-dir", str(runs)], capsys)
    assert code == 0, err
    fresh, continued = weights(runs / "fresh" / "final" / "k8"), weights(runs / "g" / "final" / "k8")
    assert not torch.equal(fresh["W_dec"], continued["W_dec"])


def assert_runs_table_shows_each_sae(status: dict[str, Any]) -> None:
    """``lenslab runs`` (laptop side) reads this status.json into one row per SAE."""
    from lenslab.cli.train import _sae_rows
    from lenslab.remote.boxstate import clean_status

    checked = clean_status(status, status["name"])
    assert checked is not None
    rows = _sae_rows(checked)
    assert [row[0].strip() for row in rows] == [s["name"] for s in status["saes"]]
    for row, sae in zip(rows, status["saes"], strict=True):
        assert row[1] == f"{sae['architecture']}/{sae['d_sae']}" and row[2] == sae["hook_name"]
        assert row[5] == f"mse {sae['losses']['mse_loss']:.4g}"


def test_runs_table_keeps_a_hostile_group_status_to_one_line_per_sae() -> None:
    from lenslab.cli.train import _sae_rows
    from lenslab.remote.boxstate import clean_status

    raw = {"name": "g", "state": "running", "saes": [
        {"name": "a\x1b[2Jb\n", "architecture": "topk", "hook_name": "h", "d_sae": 8, "losses": {"mse_loss": 0.5}},
        {"name": "c", "losses": "nonsense", "d_sae": True},
        "not an entry",
    ]}  # fmt: skip
    checked = clean_status(raw, "g")
    assert checked is not None
    rows = _sae_rows(checked)
    assert rows[0][0] == "  a [2Jb " and rows[0][5] == "mse 0.5"
    assert rows[1] == ("  c", "None/None", "None", "", "", "-")
    assert len(rows) == 2
    assert "saes" not in (clean_status({"name": "s", "state": "running"}, "s") or {})  # a single run: as before


def test_sweep_expands_a_grid(tmp_path: Path) -> None:
    from lenslab_workspace.train.config import load_run_file

    run = merge(SMALL_RUN, {"name": "sweep"})
    run["sweep"] = {"d_sae": [64, 128], "lr": [1e-4, 3e-4]}
    path = tmp_path / "sweep.toml"
    path.write_text(tomli_w.dumps(run))
    settings = load_run_file(path)
    got = [(m.name, m.sae_fields["d_sae"], m.runner_fields["lr"]) for m in settings.group]
    assert got == [
        ("d_sae-64_lr-0.0001", 64, 1e-4),
        ("d_sae-64_lr-0.0003", 64, 3e-4),
        ("d_sae-128_lr-0.0001", 128, 1e-4),
        ("d_sae-128_lr-0.0003", 128, 3e-4),
    ]
    assert all(m.sae_fields["k"] == 8 and m.architecture == "topk" for m in settings.group)
    single = tmp_path / "single.toml"
    single.write_text(tomli_w.dumps(SMALL_RUN))
    assert "group" not in load_run_file(single).comparable()  # a single run's config is as before


def test_group_config_change_is_told_apart_from_a_harmless_one(tmp_path: Path) -> None:
    from lenslab_workspace.train.config import changed_fields, load_run_file

    def settings(run: dict[str, Any]) -> dict[str, Any]:
        path = tmp_path / "g.toml"
        path.write_text(tomli_w.dumps(run))
        return load_run_file(path).comparable()

    saved = settings(group_run())
    assert changed_fields(saved, settings(group_run(resilience={"checkpoint_every_seconds": 5.0}))) == []
    wider = [dict(e) for e in GROUP_SAES]
    wider[1]["k"] = 6
    assert changed_fields(saved, settings(group_run(saes=wider))) == ["group.1.sae.k"]


BAD_GROUPS = [
    ({"saes": [{"d_in": 32, "d_sae": 64}], "sweep": {"d_sae": [64]}}, "either [[saes]] tables or a [sweep]"),
    ({"saes": []}, "holds no SAE"),
    ({"saes": 5}, "field 'saes': must be an array of tables"),
    ({"saes": [{"d_in": 32, "d_sae": 64, "training_tokens": 5}]}, "'saes[0].training_tokens': shared by every SAE"),
    ({"saes": [{"d_in": 32, "d_sae": 64, "kk": 3}]}, "saes[0] ('sae-0'): unknown field 'sae.kk'"),
    ({"saes": [{"name": "a b", "d_in": 32, "d_sae": 64}]}, "'saes[0].name': 'a b' is not a valid SAE name"),
    ({"saes": [{"name": "x", "d_sae": 64}, {"name": "x", "d_sae": 32}]}, "two SAEs are named 'x'"),
    ({"saes": [{"d_sae": 64}, {"d_in": 16, "d_sae": 32}]}, "with different d_in (32 and 16)"),
    ({"saes": [{"d_sae": 64, "k": 100}]}, "field 'sae.k': must be between 1 and sae.d_sae (64)"),
    ({"sweep": {"d_sae": []}}, "'sweep.d_sae': must be a non-empty array"),
    ({"sweep": {"d_sae": [64, 64]}}, "'sweep.d_sae': lists a value twice"),
    ({"sweep": {"context_size": [16, 32]}}, "'sweep.context_size': cannot be swept"),
    ({"sweep": {"d_sae": 64}}, "'sweep.d_sae': must be a non-empty array"),
    ({"sweep": {"d_sae": [64]}, "from_pretrained_path": "/x"}, "'from_pretrained_path': not a field of the whole"),
    (
        {"saes": [{"name": "w", "d_sae": 64, "from_pretrained_path": "/nonexistent/final"}]},
        "SAE 'w': field 'from_pretrained_path': /nonexistent/final is not a saved SAE",
    ),
    ({"sweep": {"d_sae": [64]}, "name": "../escape"}, "field 'name': '../escape' is not a valid run name"),
]


@pytest.mark.parametrize(("changes", "expected"), BAD_GROUPS)
def test_bad_group_is_refused_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], changes: dict[str, Any], expected: str
) -> None:
    run = merge(SMALL_RUN, {"name": "bad"})
    run.update(changes)
    path = tmp_path / "bad.toml"
    path.write_text(tomli_w.dumps(run))
    runs = tmp_path / "runs"
    code, err = train_in_process([str(path), "--runs-dir", str(runs)], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], err
    assert "Traceback" not in err
    assert not (runs / "bad").exists()
