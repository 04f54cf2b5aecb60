"""The real CLI against a box that lies: crafted file names, crafted listings, a crafted
bootstrap summary. Nothing on the laptop outside the destination changes, the command exits
non-zero with one line, and the ssh config still parses (with the real ``ssh -G``) to exactly
the values lenslab.toml gave.

The box is the fresh-VM container; its user's login shell is replaced by a wrapper that runs
bash as usual, except that it answers lenslab's bootstrap (``env LENSLAB_... bash -s``) and run
listing (``find final checkpoints ...``) with the contents of /etc/lenslab-hostile/summary and
/etc/lenslab-hostile/listing when those exist: what a compromised box can print, printed
through the same SSH session lenslab reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from lenslab_testkit import VM, lenslab, write_config

ROOT = "/home/debian/lenslab"
HOSTILE_SHELL = """#!/bin/bash
if [ "$1" = -c ]; then
  case $2 in
    *LENSLAB_GPU=*"bash -s"*)
      if [ -f /etc/lenslab-hostile/summary ]; then cat >/dev/null; cat /etc/lenslab-hostile/summary; exit 0; fi ;;
    *"find final checkpoints"*)
      if [ -f /etc/lenslab-hostile/listing ]; then cat /etc/lenslab-hostile/listing; exit 0; fi ;;
  esac
fi
exec /bin/bash "$@"
"""


def _safetensors() -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    return struct.pack("<Q", len(header)) + header + bytes(16)


def _put(vm: VM, path: str, data: bytes, user: str = "debian") -> None:
    write = f'mkdir -p "$(dirname "{path}")" && cat > "{path}"'
    subprocess.run(
        ["docker", "exec", "-i", "-u", user, vm.container, "sh", "-c", write],
        input=data,
        check=True,
        capture_output=True,
    )


def _sh(vm: VM, command: str, user: str = "debian") -> None:
    done = vm.exec(command, user=user)
    assert done.returncode == 0, done.stderr


@pytest.fixture
def hostile(vm_factory: type[VM], project: Path) -> VM:
    vm = vm_factory().start()
    _put(vm, "/usr/local/bin/lenslab-hostile-shell", HOSTILE_SHELL.encode(), user="root")
    _sh(vm, "chmod 755 /usr/local/bin/lenslab-hostile-shell && usermod -s /usr/local/bin/lenslab-hostile-shell "
        "debian && mkdir -p /etc/lenslab-hostile", user="root")  # fmt: skip
    # Docker access (the box's engine is this machine's), so `pull` can open the lab.
    _sh(vm, 'gid=$(stat -c %g /var/run/docker.sock); getent group "$gid" >/dev/null || groupadd -g "$gid" docker; '
        'usermod -aG "$gid" debian', user="root")  # fmt: skip
    write_config(project, vm)
    return vm


def _digest(root: Path) -> dict[str, str]:
    """Every entry below ``root`` with its kind, mode and bytes. lenslab's lock file is left out
    (lenslab's own, empty), and so is the known_hosts pin of the box's key (made by the first
    connection, before the snapshot, and never changed after)."""
    out: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        if path.name == ".lock":
            continue
        kind = "l" if path.is_symlink() else "d" if path.is_dir() else "f"
        body = hashlib.sha256(path.read_bytes()).hexdigest() if kind == "f" else ""
        out[str(path.relative_to(root))] = f"{kind} {path.lstat().st_mode:o} {body}"
    return out


def _one_line(result: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert result.returncode == code, result.stderr
    assert result.stderr.startswith("lenslab: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


def _ssh_g(home: Path, alias: str) -> dict[str, str]:
    out = subprocess.run(
        ["ssh", "-G", "-F", str(home / ".ssh" / "config"), alias], capture_output=True, text=True, check=True,
        timeout=30,
    ).stdout  # fmt: skip
    return dict(line.partition(" ")[::2] for line in out.splitlines())


def _summary(**changes: object) -> bytes:
    summary: dict[str, object] = {
        "os": "debian", "os_version": "12", "gpus": [], "driver": None, "docker": "24.0", "docker_access": "user",
        "root": ROOT, "disk_free_gb": 50, "changed": [], "warnings": [],
    }  # fmt: skip
    summary.update(changes)
    return b"bootstrap: os: debian 12\n" + json.dumps(summary).encode() + b"\n"


def test_a_crafted_bootstrap_summary_writes_nothing(hostile: VM, home: Path, tmp_path: Path, keypair: Path) -> None:
    (home / ".ssh" / "config").write_text("Host work\n    HostName work.example\n")
    first = lenslab("up", "--no-containers")
    assert first.returncode == 0, first.stderr
    before = _digest(home)
    marker = tmp_path / "pwned"
    injected = f'{ROOT}\nMatch exec "touch {marker}"\nHost *\n    ProxyCommand sh -c "touch {marker}"'
    cases = [
        (_summary(root=injected), "root '/home/debian/lenslab\\nMatch exec \"touch"),
        (_summary(root="lenslab"), "root 'lenslab' is not an absolute path"),
        (_summary(root=f"{ROOT}/../../etc"), "holds a '..' component"),
        (_summary(root=ROOT + "\u2028Match all"), "holds the control or whitespace character U+2028"),
        (_summary(warnings=["\x1b]0;owned\x07"]), "warnings '\\x1b]0;owned\\x07' holds the control character \\x1b"),
        (_summary(gpus="many"), "gpus is 'many', not list"),
        (_summary(disk_free_gb=True), "disk_free_gb is True, not int or float"),
        (b"[]\n", "bootstrap.sh printed a summary that is no JSON object"),
    ]
    for crafted, says in cases:
        _put(hostile, "/etc/lenslab-hostile/summary", crafted, user="root")
        _one_line(lenslab("up", "--no-containers"), 4, says)
        assert _digest(home) == before, says
    # What plain ssh (and VSCode) read: exactly the box of lenslab.toml, nothing injected.
    seen = _ssh_g(home, "lenslab-t")
    assert (seen["hostname"], seen["user"], seen["port"]) == ("127.0.0.1", "debian", str(hostile.port))
    assert seen["identityfile"] == str(keypair)
    assert "proxycommand" not in seen
    assert _ssh_g(home, "work")["hostname"] == "work.example"
    assert not marker.exists()
    # The box's honest answer is still taken: the crafted summary was the only thing refused.
    hostile.exec("rm /etc/lenslab-hostile/summary", user="root")
    assert lenslab("up", "--no-containers").returncode == 0


def _good_run(vm: VM, name: str) -> None:
    _put(vm, f"{ROOT}/runs/{name}/final/cfg.json", b'{"d_in": 4}')
    _put(vm, f"{ROOT}/runs/{name}/final/sae_weights.safetensors", _safetensors())


def test_pull_refuses_what_a_hostile_box_lists(hostile: VM, project: Path, home: Path, tmp_path: Path) -> None:
    _good_run(hostile, "good")
    first = lenslab("pull", "good")
    assert first.returncode == 0, first.stderr
    pulled = project / "runs" / "good" / "final"
    assert (pulled / "sae_weights.safetensors").read_bytes() == _safetensors()
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "keep.txt").write_text("keep\n")
    before = _digest(tmp_path)

    run = f"{ROOT}/runs"
    _sh(
        hostile,
        f"mkdir -p {run}/nl/checkpoints/$'step-1\\n..' && touch {run}/nl/checkpoints/$'step-1\\n..'/manifest.json",
    )
    _good_run(hostile, "link")
    _sh(hostile, f"ln -s /etc/passwd {run}/link/final/extra.json")
    _sh(hostile, f"mkdir -p {run}/away && ln -s {run}/good/final {run}/away/final")
    _one_line(lenslab("pull", "nl"), 9, "the box lists 'checkpoints/step-1\\n..' in", "not a checkpoint name")
    _one_line(lenslab("pull", "link"), 9, "the box lists 'extra.json' in final, which is not a regular file")
    _one_line(lenslab("pull", "away"), 9, "the box lists 'final' in", "which is not a plain directory")

    listings = {
        b"d 4096 final\0f 5 final//etc/passwd\0": "'/etc/passwd' in final, which is not a simple file name",
        b"d 4096 final\0f 5 final/../../../outside/keep.txt\0": "'../../../outside/keep.txt' in final",
        b"d 4096 checkpoints/step-1/../../../../outside\0": "'checkpoints/step-1/../../../../outside' in",
        b"d 4096 checkpoints/step-9\n../../..\0f 9 checkpoints/step-9\n../../../manifest.json\0": "step-9\\n..",
    }
    for listing, says in listings.items():
        _put(hostile, "/etc/lenslab-hostile/listing", listing, user="root")
        _one_line(lenslab("pull", "good"), 9, says)
    assert _digest(tmp_path) == before  # the earlier pull of "good" included


STREAM_PROBE = textwrap.dedent(
    """
    import hashlib, io, sys, tracemalloc
    from pathlib import Path
    from lenslab import files
    from lenslab.remote.ssh import SSHLink, Target
    port, key, dest = int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    target = Target("127.0.0.1", port, "debian", key, files.known_hosts_path())
    with SSHLink.connect(target) as link:
        tracemalloc.start()
        got = link.get("/home/debian/big.bin", dest)
        link.put(dest, "/home/debian/big.back")
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        back = link.run("sha256sum /home/debian/big.back", check=True).stdout.split()[0]
    print(got, peak, back)
    """
)


@pytest.mark.slow
def test_ssh_get_and_put_stream_64_mib_with_bounded_memory(vm_factory: type[VM], keypair: Path, tmp_path: Path) -> None:
    vm = vm_factory(with_docker=False).start()
    _sh(vm, "head -c 64M /dev/urandom > /home/debian/big.bin")
    expected = vm.exec("sha256sum /home/debian/big.bin").stdout.split()[0]
    dest = tmp_path / "big.bin"
    probe = subprocess.run(
        [sys.executable, "-c", STREAM_PROBE, str(vm.port), str(keypair), str(dest)],
        capture_output=True, text=True, check=False, timeout=300, env=os.environ,
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr
    got, peak, back = probe.stdout.split()
    assert int(got) == 64 << 20 == dest.stat().st_size
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == expected == back
    # Held whole, the file alone would be 64 MiB (twice, with the copy to bytes); streamed, the
    # peak is a few chunks plus the channel's window.
    assert int(peak) < 16 << 20, f"peak {int(peak)} bytes"


def test_a_large_put_the_box_cannot_write_says_why(vm_factory: type[VM], keypair: Path, home: Path) -> None:
    """The command stops reading early (no permission): its own error comes back, not a
    broken pipe reported as a lost link."""
    from lenslab import files
    from lenslab.errors import CommandFailed
    from lenslab.remote.ssh import SSHLink, Target

    vm = vm_factory(with_docker=False).start()
    target = Target("127.0.0.1", vm.port, "debian", keypair, files.known_hosts_path())
    with SSHLink.connect(target) as link, pytest.raises(CommandFailed) as caught:
        link.put(bytes(16 << 20), "/root/denied/blob.bin")
    assert "Permission denied" in str(caught.value)
