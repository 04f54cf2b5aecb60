"""The one edge where paramiko, socket and timeout exceptions become lenslab errors.

``MAPPED`` lists every exception class the SSH link can raise and the lenslab error it becomes;
a test fails when paramiko grows a class that is not listed here. Lookup walks the MRO, so a
subclass paramiko adds later still lands somewhere sensible, but the test asks for an explicit
entry.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import paramiko
from paramiko import ssh_exception as pe

from lenslab.errors import (
    AuthenticationRefused,
    ConnectionLost,
    HostKeyChanged,
    HostUnreachable,
    LenslabError,
    RemoteError,
)
from lenslab.remote import hostkeys

MAPPED: dict[type[BaseException], type[RemoteError]] = {
    # Authentication
    pe.AuthenticationException: AuthenticationRefused,
    pe.BadAuthenticationType: AuthenticationRefused,
    pe.PartialAuthentication: AuthenticationRefused,
    pe.PasswordRequiredException: AuthenticationRefused,
    pe.UnableToAuthenticate: AuthenticationRefused,
    # Host identity
    pe.BadHostKeyException: HostKeyChanged,
    # Reaching the host at all
    pe.NoValidConnectionsError: HostUnreachable,
    pe.ProxyCommandFailure: HostUnreachable,
    pe.CouldNotCanonicalize: HostUnreachable,
    socket.gaierror: HostUnreachable,
    socket.herror: HostUnreachable,
    TimeoutError: HostUnreachable,
    ConnectionRefusedError: HostUnreachable,
    # The session broke, or the peer is not a usable SSH server
    pe.SSHException: ConnectionLost,
    pe.ChannelException: ConnectionLost,
    pe.IncompatiblePeer: ConnectionLost,
    pe.MessageOrderError: ConnectionLost,
    pe.ConfigParseError: ConnectionLost,
    ConnectionResetError: ConnectionLost,
    ConnectionAbortedError: ConnectionLost,
    BrokenPipeError: ConnectionLost,
    EOFError: ConnectionLost,
    OSError: HostUnreachable,
}


@dataclass(frozen=True)
class Where:
    """What the message needs to say which box and how to fix it."""

    host: str
    port: int
    user: str
    identity_file: Path
    known_hosts: Path


def translate(exc: BaseException, where: Where) -> RemoteError:
    kind = next((MAPPED[cls] for cls in type(exc).__mro__ if cls in MAPPED), ConnectionLost)
    target = f"{where.user}@{where.host}:{where.port}"
    if kind is AuthenticationRefused:
        return AuthenticationRefused(
            f"{target} refused key {where.identity_file}",
            f"add {where.identity_file}.pub to ~/.ssh/authorized_keys on the box, "
            "or set box.identity_file in lenslab.toml",
        )
    if kind is HostKeyChanged and isinstance(exc, pe.BadHostKeyException):
        return HostKeyChanged(
            f"host key of {hostkeys.host_entry(where.host, where.port)} changed: pinned "
            f"{hostkeys.fingerprint(exc.expected_key)}, box now offers {hostkeys.fingerprint(exc.key)}",
            "if the box was rebuilt, forget the old key with: "
            + hostkeys.reset_command(where.host, where.port, where.known_hosts),
        )
    if kind is HostUnreachable:
        return HostUnreachable(
            f"cannot reach {where.host}:{where.port} ({_reason(exc)})",
            "check box.host and box.port in lenslab.toml and that the box is running",
        )
    return ConnectionLost(f"SSH session with {target} failed ({_reason(exc)})", "retry the command")


def _reason(exc: BaseException) -> str:
    # paramiko's own wording for these is long and names no cause a user can act on.
    if isinstance(exc, (pe.NoValidConnectionsError, ConnectionRefusedError)):
        return "connection refused"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, (socket.gaierror, socket.herror)):
        return "unknown host"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@contextmanager
def ssh_errors(where: Where) -> Iterator[None]:
    """Run a block of paramiko/socket calls; whatever they raise leaves as a lenslab error."""
    try:
        yield
    except LenslabError:
        raise
    except (paramiko.SSHException, OSError, EOFError) as exc:
        raise translate(exc, where) from exc
