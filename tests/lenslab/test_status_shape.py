"""`lenslab status` believes only the box facts it knows, of the types it expects: a hostile or
broken nvidia-smi (or shell) on the box can neither crash it nor speak for the laptop's fields."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from lenslab_testkit import lenslab

# Closes the GPU row early and adds fields of its own, as a hostile nvidia-smi could.
INJECTION = 'A100, 81920, 0}],"root_used_kb":null,"autostop":{"x":1},"cost":{"cost_usd":0},"box":"evil","z":[{"a":1'
FACTS = {
    "root": "/srv/lenslab",
    "root_exists": True,
    "root_used_kb": 4,
    "disk_total_kb": 1048576,
    "disk_free_kb": 524288,
    "gpus": [{"name": "H100", "memory_mib": 81559, "utilization_pct": None}],
    "driver": "550.54",
    "uptime_s": 3600,
    "containers": 0,
}


@pytest.fixture
def fake_bin(project: Path, home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (project / "lenslab.toml").write_text(f'[box]\nname = "tiny"\nprovider = "local"\nroot = "{tmp_path}/root"\n')
    directory = tmp_path / "bin"
    directory.mkdir()
    monkeypatch.setenv("PATH", f"{directory}{os.pathsep}{os.environ['PATH']}")
    return directory


def _script(path: Path, text: str) -> None:
    path.write_text("#!/bin/sh\n" + text)
    path.chmod(0o755)


def test_an_injecting_nvidia_smi_gives_a_sane_status(fake_bin: Path) -> None:
    _script(
        fake_bin / "nvidia-smi",
        'case "$*" in -L) echo "GPU 0: x";; *driver_version*) printf \'550\\033[2J"\\n\';;\n'
        f"*) cat <<'END'\n{INJECTION}\nH100 \"pro\", [N/A], 07\nEND\n;; esac\n",
    )
    result = lenslab("status", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert (data["box"], data["autostop"], data.get("cost"), data["autostop_text"]) == ("tiny", None, None, "off")
    assert "z" not in data
    assert data["gpus"] == [
        {"name": "A100", "memory_mib": 81920, "utilization_pct": None},
        {"name": "H100 pro", "memory_mib": None, "utilization_pct": 7},
    ]
    assert data["driver"] == "5502J"  # the escape sequence's bytes are gone, not printed
    text = lenslab("status")
    assert text.returncode == 0 and text.stderr == ""
    assert "gpus:   A100 (81920 MiB, ?%), H100 pro (? MiB, 7%)" in text.stdout


def _fake_shell(fake_bin: Path, facts: object) -> None:
    """A box whose shell prints ``facts`` for status.sh (read on stdin) and runs all else."""
    real = shutil.which("bash")
    _script(
        fake_bin / "bash",
        f'case "$2" in *"bash -s"*) cat >/dev/null; cat <<\'END\'\n{json.dumps(facts)}\nEND\n;;\n'
        f'*) exec {real} "$@";; esac\n',
    )


def test_the_laptops_fields_cannot_be_set_by_the_box_and_unknown_ones_are_dropped(fake_bin: Path) -> None:
    extra = {"box": "evil", "provider": "x", "cost": {"cost_usd": 0}, "instances": [], "reachable": False}
    _fake_shell(fake_bin, {**FACTS, **extra, "autostop": {"acted": "x"}, "z": 1})
    result = lenslab("status", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert {key: data.get(key) for key in (*extra, "autostop", "z")} == {
        "box": "tiny",
        "provider": "local",
        "cost": None,
        "instances": None,
        "reachable": True,
        "autostop": None,
        "z": None,
    }
    assert {key: data[key] for key in FACTS} == FACTS


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"gpus": [{"name": 5, "memory_mib": 1, "utilization_pct": 1}]}, "gpus[0].name is 5, not str"),
        ({"gpus": ["H100"]}, "gpus[0] is 'H100', not an object"),
        ({"uptime_s": True}, "uptime_s is True, not int or NoneType"),
        ({"root": "/x\n"}, "root '/x\\n' holds a control character or is too long"),
        ({"containers": "2"}, "containers is '2', not int or NoneType"),
    ],
    ids=["gpu-name", "gpu-text", "bool", "newline", "text-number"],
)
def test_facts_of_the_wrong_shape_are_one_line(fake_bin: Path, change: dict[str, object], problem: str) -> None:
    _fake_shell(fake_bin, {**FACTS, **change})
    result = lenslab("status")
    assert result.returncode == 4 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert f"status.sh's facts are not what lenslab expects: {problem}" in result.stderr


def test_missing_facts_are_one_line(fake_bin: Path) -> None:
    _fake_shell(fake_bin, {"gpus": []})
    result = lenslab("status")
    assert result.returncode == 4 and result.stderr.count("\n") == 1
    assert "root is None, not str" in result.stderr
