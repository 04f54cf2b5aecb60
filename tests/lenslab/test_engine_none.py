"""`engine = "none"`: how lenslab.toml says so, what `up` says on a box without lenslab-box,
and how the laptop checks what `lenslab-box` answers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from lenslab_testkit import VM, lenslab, write_config

from lenslab.remote.processlab import parse_runs, supervisor_facts

BASE = '[box]\nname = "gpu1"\nhost = "203.0.113.7"\nuser = "ubuntu"\n'


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (BASE + 'provider = "ssh"\nengine = "podman"\n', "box.engine: Input should be 'docker' or 'none'"),
        (BASE + 'provider = "ssh"\nengine = false\n', "box.engine: Input should be 'docker' or 'none'"),
        (
            '[box]\nname = "gpu1"\nprovider = "lambda"\nengine = "none"\n',
            'box: engine = "none" is for a machine you bring over SSH; not for lambda',
        ),
    ],
    ids=["unknown", "bool", "cloud"],
)
def test_a_bad_engine_is_one_line(project: Path, text: str, expected: str) -> None:
    path = project / "lenslab.toml"
    path.write_text(text)
    result = lenslab("status")
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.startswith(f"lenslab: error: {path}: {expected}"), result.stderr
    assert result.stderr.count("\n") == 1


def test_up_on_a_box_without_lenslab_box_says_what_to_do(vm_factory: type[VM], project: Path, home: Path) -> None:
    vm = vm_factory(with_docker=False).start()
    write_config(project, vm, engine="none", root="/tmp/lab")
    result = lenslab("up")
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr == (
        "lenslab: error: the box has no working lenslab-box (exit 127); run lenslab's image on the box with "
        "`lenslab-box serve` as its start command, or `pip install lenslab-workspace` there so that lenslab-box "
        "is on PATH\n"
    )
    # Nothing was bootstrapped: no Docker installed, no root made, no ssh entry written.
    assert vm.exec("command -v docker || ls /tmp/lab").returncode != 0
    assert not (home / ".ssh" / "lenslab" / "config").exists()


def test_what_lenslab_box_lists_is_checked_before_use() -> None:
    raw = [
        {"name": "ok", "status": {"name": "ok", "state": "running", "step": 3, "started_at": 10.0},
         "supervisor": {"alive": True, "phase": "running", "restarts": 2, "last_exit_code": 137, "launched_at": 9.0}},
        {"name": "bad\nname", "status": {"name": "bad\nname", "state": "running"}, "supervisor": None},
        {"name": "../up", "status": None, "supervisor": {"alive": True}},
        {"name": "other", "status": {"name": "ok", "state": "running"}, "supervisor": None},
        {"name": "dead", "status": None, "supervisor": {"alive": "yes", "restarts": True, "launched_at": "x"}},
        "not a dict",
    ]  # fmt: skip
    found = parse_runs(raw)
    assert sorted(found) == ["dead", "ok"]
    assert found["ok"]["step"] == 3
    assert found["ok"]["container"] == {
        "state": "running", "exit_code": 137, "restarts": 2, "created": 9.0, "launched": True,
    }  # fmt: skip
    # A truthy non-bool is not alive, a bool is no count, a string no time.
    assert found["dead"]["container"] == {
        "state": "exited", "exit_code": None, "restarts": 0, "created": 0.0, "launched": False,
    }  # fmt: skip
    assert found["dead"]["state"] == "starting"
    assert parse_runs({"name": "x"}) == {} and supervisor_facts(None) is None


def _box_answering(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, answer: str) -> None:
    """A real ``lenslab-box`` on PATH that prints ``answer`` whatever it is asked."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "reply.json").write_text(answer)
    script = bin_dir / "lenslab-box"
    script.write_text(f"#!/bin/sh\ncat {bin_dir / 'reply.json'}\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")


def test_a_hostile_answer_is_one_unexpected_reply_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lenslab.errors import RemoteError
    from lenslab.remote.bootstrap import LocalRunner
    from lenslab.remote.lab import Lab
    from lenslab.remote.processlab import ProcessLab, ask

    _box_answering(tmp_path, monkeypatch, "[" * 100_000 + "]" * 100_000)
    with pytest.raises(RemoteError) as caught:
        ask(LocalRunner(), "/lab", "runs", "--json")
    assert str(caught.value).startswith("lenslab-box runs printed no JSON")  # not a RecursionError
    lab = ProcessLab(LocalRunner(), Lab("b", "/lab", "img", False))
    for token in ("t\u00f6ken", "\u0661\u0662\u0663"):  # alphanumeric, but not ASCII
        _box_answering(tmp_path, monkeypatch, json.dumps({"port": 8888, "token": token}))
        with pytest.raises(RemoteError, match="answered no port and token"):
            lab.jupyter_access()
    _box_answering(tmp_path, monkeypatch, json.dumps({"port": 8888, "token": "abc123"}))
    assert lab.jupyter_access() == (8888, "abc123")


def test_a_negative_restart_count_is_no_restart() -> None:
    facts = supervisor_facts({"alive": True, "phase": "running", "restarts": -7, "launched_at": 1.0})
    assert facts is not None and facts["restarts"] == 0
