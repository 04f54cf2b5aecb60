"""`lenslab up / status / ssh / code / down` on a fresh-VM box, driven through the real CLI."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from lenslab_testkit import IMAGE, LENSLAB, VM, docker, lenslab, write_config

ROOT = "/home/debian/lenslab"


def _tree(vm: VM) -> str:
    """What bootstrap may touch on the box: the root's tree and the user's groups."""
    return vm.exec(f"find {ROOT} -printf '%p %m %u\\n' | sort; id debian").stdout


def test_up_bootstraps_once_and_a_second_up_changes_nothing(box: VM) -> None:
    first = lenslab("up", "--json")
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout)["bootstrap"]
    assert summary["os"] == "debian" and summary["root"] == ROOT
    assert summary["changed"] == [
        "added debian to group docker",
        f"created {ROOT}/{{workspace,checkpoints,hf-cache,runs}}",
    ]
    assert summary["warnings"] == ["no NVIDIA GPU found: running in CPU mode"]
    before = _tree(box)
    assert all(f"{ROOT}/{sub} 755 debian" in before for sub in ("workspace", "checkpoints", "hf-cache", "runs"))

    second = lenslab("up", "--json")
    assert second.returncode == 0, second.stderr
    again = json.loads(second.stdout)["bootstrap"]
    assert again["changed"] == []
    assert again["docker_access"] == "user"  # the group granted by the first run is in effect
    assert _tree(box) == before

    text = lenslab("up")
    assert "changed: nothing (already ready)" in text.stdout
    assert "shell:  ssh lenslab-t" in text.stdout


def test_status_ssh_code_down(box: VM, home: Path) -> None:
    assert lenslab("up").returncode == 0
    status = lenslab("status", "--json")
    assert status.returncode == 0, status.stderr
    facts = json.loads(status.stdout)
    assert facts["reachable"] is True and facts["root"] == ROOT and facts["root_exists"] is True
    assert facts["gpus"] == [] and facts["driver"] is None
    assert facts["uptime_s"] >= 0 and facts["disk_free_kb"] > 0 and facts["containers"] == 0

    ran = lenslab("ssh", "--", "sh", "-c", "echo $(whoami) on the box; exit 3")
    assert (ran.returncode, ran.stdout) == (3, "debian on the box\n")

    code = lenslab("code", "--print")
    assert code.stdout == f"code --remote ssh-remote+lenslab-t {ROOT}/workspace\n"

    # A container lenslab started on the box (labelled with the box name) is stopped by down.
    started = docker("run", "-d", "--label", "lenslab.box=t", "--label", "lenslab-test", "--init",
                     "--network", "none", IMAGE, "sleep", "300").stdout.strip()  # fmt: skip
    assert json.loads(lenslab("status", "--json").stdout)["containers"] == 1
    down = lenslab("down", "--json")
    assert down.returncode == 0, down.stderr
    result = json.loads(down.stdout)
    assert result["stopped"] == [started[:12]] and result["ssh_entry_removed"] is True
    assert docker("inspect", "-f", "{{.State.Running}}", started).stdout.strip() == "false"
    assert not (home / ".ssh" / "lenslab" / "config").exists()  # its only entry is gone
    assert not (home / ".ssh" / "config").exists()
    assert box.exec(f"test -d {ROOT}/checkpoints").returncode == 0  # data kept
    assert lenslab("down").returncode == 0  # down twice is fine


def _openssh(home: Path, *cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ssh", "-F", str(home / ".ssh" / "config"), "-o", "BatchMode=yes", "lenslab-t", *cmd],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


def test_openssh_client_uses_the_generated_config_with_strict_host_keys(box: VM, home: Path) -> None:
    assert lenslab("up").returncode == 0
    ok = _openssh(home, "true")
    assert ok.returncode == 0, ok.stderr

    box.rebuild()  # fresh host keys on the same address
    refused = _openssh(home, "true")
    assert refused.returncode == 255
    assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in refused.stderr

    up = lenslab("up")
    known = home / ".ssh" / "lenslab" / "known_hosts"
    assert up.returncode == 3
    assert up.stderr.startswith(f"lenslab: error: host key of [127.0.0.1]:{box.port} changed: pinned SHA256:")
    assert up.stderr.endswith(
        f"; if the box was rebuilt, forget the old key with: ssh-keygen -R '[127.0.0.1]:{box.port}' -f {known}\n"
    )
    assert "Traceback" not in up.stderr and up.stderr.count("\n") == 1


@pytest.mark.slow
def test_up_installs_docker_on_a_box_without_it(vm_factory: type[VM], project: Path) -> None:
    """A fresh Debian box with no Docker: bootstrap installs docker.io from the Debian archive."""
    vm = vm_factory(with_docker=False).start()
    write_config(project, vm)
    assert vm.exec("command -v docker").returncode != 0
    first = lenslab("up", "--json", timeout=600)
    assert first.returncode == 0, first.stderr
    changed = json.loads(first.stdout)["bootstrap"]["changed"]
    assert changed[0] == "installed docker.io"
    assert vm.exec("docker info --format '{{.ServerVersion}}'", user="debian").returncode == 0
    second = lenslab("up", "--json")
    assert json.loads(second.stdout)["bootstrap"]["changed"] == []


def test_down_on_a_box_that_is_gone_still_removes_its_entry(box: VM, home: Path) -> None:
    assert lenslab("up").returncode == 0
    box.stop()
    down = lenslab("down")
    assert down.returncode == 0
    assert down.stderr.startswith(f"lenslab: warning: cannot reach 127.0.0.1:{box.port} (connection refused)")
    assert down.stderr.endswith("; its containers were left as they are\n")
    assert not (home / ".ssh" / "config").exists()


def test_plain_lenslab_ssh_runs_the_openssh_client_on_the_alias(box: VM) -> None:
    assert lenslab("up").returncode == 0
    # No terminal: the remote shell reads its commands from stdin, as `ssh host < script` does.
    shell = subprocess.run(
        [LENSLAB, "ssh"], input="echo \"I am $(whoami) on $(hostname)\"\n", capture_output=True,
        text=True, timeout=30, check=False,
    )  # fmt: skip
    assert shell.returncode == 0, shell.stderr
    assert shell.stdout.splitlines()[-1].startswith("I am debian on "), shell.stdout  # after the MOTD


def test_progress_is_shown_on_a_terminal(box: VM) -> None:
    # `script` gives lenslab a pseudo-terminal, as a user's shell would.
    shown = subprocess.run(
        ["script", "-qec", f"{LENSLAB} up", "/dev/null"], capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stdout
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown.stdout)  # drop colours and cursor moves
    assert f"✓ connecting to debian@127.0.0.1:{box.port}" in plain
    assert "✓ bootstrapping (Docker, GPU, persistent root)" in plain


def test_code_opens_the_root_where_the_box_resolved_it(box: VM) -> None:
    box.exec("mkdir -p /data/users && usermod -d /data/users/debian -m debian")
    assert lenslab("code", "--print").stdout == f"code --remote ssh-remote+lenslab-t {ROOT}/workspace\n"
    assert lenslab("up").returncode == 0
    # After `up`, the recorded root wins over the /home/<user> guess.
    expected = "code --remote ssh-remote+lenslab-t /data/users/debian/lenslab/workspace\n"
    assert lenslab("code", "--print").stdout == expected
