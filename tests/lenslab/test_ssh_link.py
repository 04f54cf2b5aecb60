"""The SSH link against a real sshd: run, put/get, forward, retries, pinned host keys."""

from __future__ import annotations

import io
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import BinaryIO, cast

import pytest
from lenslab_testkit import VM

from lenslab import files
from lenslab.errors import AuthenticationRefused, HostKeyChanged, HostUnreachable
from lenslab.remote import hostkeys
from lenslab.remote.ssh import SSHLink, Target


def _target(vm: VM, key: Path, expected: str | None = None) -> Target:
    return Target("127.0.0.1", vm.port, "debian", key, files.known_hosts_path(), expected)


def test_run_streams_output_and_returns_exit_status(vm: VM, keypair: Path) -> None:
    seen: list[tuple[str, str]] = []
    with SSHLink.connect(_target(vm, keypair)) as link:
        result = link.run("echo out; echo err >&2; exit 7", on_output=lambda s, t: seen.append((s, t)))
        echoed = link.run("cat", stdin=b"from stdin")
    assert (result.exit_status, result.stdout, result.stderr) == (7, "out\n", "err\n")
    assert ("stdout", "out\n") in seen and ("stderr", "err\n") in seen
    assert echoed.stdout == "from stdin"


def test_put_and_get_round_trip_with_mode(vm: VM, keypair: Path) -> None:
    data = bytes(range(256)) * 1000
    with SSHLink.connect(_target(vm, keypair)) as link:
        link.put(data, "/home/debian/sub/dir/blob.bin", mode=0o600)
        copy = io.BytesIO()
        assert link.get("/home/debian/sub/dir/blob.bin", copy) == len(data)
        assert copy.getvalue() == data
    assert vm.exec("stat -c %a /home/debian/sub/dir/blob.bin").stdout.strip() == "600"


class _Watched(io.RawIOBase):
    """A stream that, before its second chunk, records the mode of the half-written file."""

    def __init__(self, vm: VM, tmp: str) -> None:
        self.vm, self.tmp, self.reads, self.mode = vm, tmp, 0, ""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray) -> int:  # type: ignore[override]
        self.reads += 1
        if self.reads == 2:
            deadline = time.monotonic() + 10
            while not self.mode and time.monotonic() < deadline:
                self.mode = self.vm.exec(f"stat -c %a {self.tmp} 2>/dev/null").stdout.strip()
        if self.reads > 3:
            return 0
        buffer[:1024] = b"s" * 1024
        return 1024


def test_put_writes_a_secret_that_no_one_else_can_read_even_while_it_arrives(vm: VM, keypair: Path) -> None:
    path = "/home/debian/cfg/secret.json"
    source = _Watched(vm, path + ".lenslab-tmp")
    with SSHLink.connect(_target(vm, keypair)) as link:
        link.put(cast(BinaryIO, source), path, mode=0o600)
        link.put(b"public", "/home/debian/cfg/plain.txt")
    assert source.mode == "600"  # under the default umask it was 644 until the chmod
    assert vm.exec(f"stat -c %a {path} /home/debian/cfg/plain.txt").stdout.split() == ["600", "644"]


def test_local_port_forward_reaches_a_server_on_the_box(vm: VM, keypair: Path) -> None:
    port = _free_port()
    server = (
        f"import socket; s = socket.create_server(('127.0.0.1', {port})); c, _ = s.accept(); "
        "c.sendall(b'hello from the box ' + c.recv(10))"
    )
    with SSHLink.connect(_target(vm, keypair)) as link:
        threading.Thread(target=link.run, args=(f'python3 -c "{server}"',), daemon=True).start()
        vm_ready_deadline = time.monotonic() + 10
        while vm.exec(f"ss -ltn | grep -q :{port}").returncode != 0:
            assert time.monotonic() < vm_ready_deadline, "server on the box did not start"
            time.sleep(0.1)
        with (
            link.forward(0, "127.0.0.1", port) as fwd,
            socket.create_connection(("127.0.0.1", fwd.local_port), timeout=10) as conn,
        ):
            conn.sendall(b"tunnel")
            assert conn.recv(100) == b"hello from the box tunnel"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_connect_retries_while_the_box_boots(vm_factory: type[VM], keypair: Path) -> None:
    vm = vm_factory()
    retries: list[int] = []
    timer = threading.Timer(2.0, vm.start)
    timer.start()
    try:
        with SSHLink.connect(_target(vm, keypair), on_retry=lambda n, e: retries.append(n)) as link:
            assert link.run("echo up").stdout == "up\n"
    finally:
        timer.join()
    assert retries, "the first attempt should have found the box still booting"


def test_unreachable_after_the_last_attempt(keypair: Path) -> None:
    port = _free_port()
    target = Target("127.0.0.1", port, "debian", keypair, files.known_hosts_path())
    with pytest.raises(HostUnreachable, match=rf"^cannot reach 127.0.0.1:{port} "):
        SSHLink.connect(target, attempts=2)


def test_wrong_key_is_refused_without_retrying(vm_factory: type[VM], keypair: Path) -> None:
    vm = vm_factory(authorized_key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBgT0jRyIq0ndzJhKk2ZXpUUnBm5RqgGzmwY5uMUxLmb x")
    vm.start()
    started = time.monotonic()
    with pytest.raises(AuthenticationRefused):
        SSHLink.connect(_target(vm, keypair))
    assert time.monotonic() - started < 5


def test_first_use_pins_the_real_host_key_and_a_rebuilt_box_is_refused(vm: VM, keypair: Path) -> None:
    SSHLink.connect(_target(vm, keypair)).close()
    known = files.known_hosts_path()
    assert oct(known.stat().st_mode & 0o777) == "0o600"
    lines = known.read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"[127.0.0.1]:{vm.port} ssh-ed25519 ")
    pinned = vm.host_key_fingerprint()

    vm.rebuild()  # same address, fresh host keys: what a reinstalled box looks like
    with pytest.raises(HostKeyChanged) as caught:
        SSHLink.connect(_target(vm, keypair))
    message = str(caught.value)
    assert f"pinned {pinned}, box now offers {vm.host_key_fingerprint()}" in message
    assert message.endswith(hostkeys.reset_command("127.0.0.1", vm.port, known))

    subprocess.run(hostkeys.reset_command("127.0.0.1", vm.port, known), shell=True, check=True)
    SSHLink.connect(_target(vm, keypair)).close()  # after the reset, the new key is pinned


def test_a_fingerprint_announced_by_the_provider_is_verified(vm: VM, keypair: Path) -> None:
    wrong = "SHA256:" + "A" * 43
    with pytest.raises(HostKeyChanged, match=f"but the provider announced {wrong}"):
        SSHLink.connect(_target(vm, keypair, expected=wrong))
    assert not files.known_hosts_path().exists() or not files.known_hosts_path().read_text()
    SSHLink.connect(_target(vm, keypair, expected=vm.host_key_fingerprint())).close()
    assert files.known_hosts_path().read_text().count("\n") == 1
