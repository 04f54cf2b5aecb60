"""The local provider: this machine is the box (bootstrap runs here, no SSH involved)."""

from __future__ import annotations

import json
from pathlib import Path

from lenslab_testkit import lenslab


def test_local_up_status_down(project: Path, home: Path, docker_ready: None) -> None:
    root = home / "lab-data"
    (project / "lenslab.toml").write_text(
        f'[box]\nname = "here"\nprovider = "local"\nroot = "{root}"\ngpu = "optional"\n'
    )
    first = lenslab("up", "--json")
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout)["bootstrap"]
    assert summary["changed"] == [f"created {root}/{{workspace,checkpoints,hf-cache,runs}}"]
    assert sorted(p.name for p in root.iterdir()) == ["checkpoints", "hf-cache", "runs", "workspace"]
    assert json.loads(lenslab("up", "--json").stdout)["bootstrap"]["changed"] == []
    assert not (home / ".ssh" / "config").exists()  # nothing to reach over SSH

    status = json.loads(lenslab("status", "--json").stdout)
    assert status["reachable"] is True and status["root"] == str(root) and status["root_exists"] is True

    ran = lenslab("ssh", "--", "sh", "-c", "echo local; exit 5")
    assert (ran.returncode, ran.stdout) == (5, "local\n")
    assert lenslab("code", "--print").stdout == f"code {root}/workspace\n"

    down = lenslab("down", "--json")
    assert down.returncode == 0, down.stderr
    assert json.loads(down.stdout)["stopped"] == []
    assert (root / "checkpoints").is_dir()


def test_default_local_root_is_under_the_users_data_dir(project: Path, home: Path, docker_ready: None) -> None:
    (project / "lenslab.toml").write_text('[box]\nname = "here"\nprovider = "local"\n')
    result = lenslab("up", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["bootstrap"]["root"] == f"{home}/.local/share/lenslab"
