"""Pinned host keys, in lenslab's own known_hosts (OpenSSH format, so plain ``ssh`` and VSCode
use the very same pins through the generated ssh config).

The first connection to a box records its key, unless the provider told us the fingerprint in
advance, in which case the key must match it. A later mismatch is refused by paramiko
(``BadHostKeyException``) and reported as ``HostKeyChanged`` by ``lenslab.remote.errmap``.
"""

from __future__ import annotations

import base64
import hashlib
import shlex
from pathlib import Path

import paramiko

from lenslab import files
from lenslab.errors import HostKeyChanged


def fingerprint(key: paramiko.PKey) -> str:
    """The SHA256 fingerprint exactly as ``ssh-keygen -lf`` and OpenSSH print it."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def host_entry(host: str, port: int) -> str:
    """The name OpenSSH and paramiko both file a host key under."""
    return host if port == 22 else f"[{host}]:{port}"


def reset_command(host: str, port: int, known_hosts: Path) -> str:
    return f"ssh-keygen -R {shlex.quote(host_entry(host, port))} -f {shlex.quote(str(known_hosts))}"


def record(known_hosts: Path, entry: str, key: paramiko.PKey) -> None:
    with files.locked():
        existing = known_hosts.read_text() if known_hosts.exists() else ""
        line = f"{entry} {key.get_name()} {key.get_base64()}\n"
        if line in existing:
            return
        files.write_atomic(known_hosts, existing + line, 0o600)


def forget(known_hosts: Path, entry: str) -> bool:
    """Drop the pinned key of ``entry``: for a cloud instance lenslab terminated, whose address
    a new machine with new keys will get. Returns whether a key was on file."""
    with files.locked():
        if not known_hosts.exists():
            return False
        lines = known_hosts.read_text().splitlines(keepends=True)
        kept = [line for line in lines if line.split(" ", 1)[0] != entry]
        if len(kept) == len(lines):
            return False
        files.write_atomic(known_hosts, "".join(kept), 0o600)
        return True


class PinOnFirstUse(paramiko.MissingHostKeyPolicy):
    """Called by paramiko only when the host has no key on file: verify or record, never skip."""

    def __init__(self, known_hosts: Path, expected: str | None) -> None:
        self.known_hosts = known_hosts
        self.expected = expected

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        got = fingerprint(key)
        if self.expected is not None and got != self.expected:
            raise HostKeyChanged(
                f"host key of {hostname} is {got}, but the provider announced {self.expected}",
                "refusing to connect; check that host and port point at your box",
            )
        record(self.known_hosts, hostname, key)
