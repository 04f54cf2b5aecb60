"""Every exception the SSH link can raise is mapped, at one edge, to a lenslab error."""

from __future__ import annotations

import inspect
import socket
from pathlib import Path

import paramiko
import pytest
from paramiko import ssh_exception

from lenslab import errors
from lenslab.remote import hostkeys
from lenslab.remote.errmap import MAPPED, Where, ssh_errors, translate

WHERE = Where("box.example", 2222, "debian", Path("/k/id"), Path("/k/known_hosts"))


def _paramiko_exceptions() -> list[type[BaseException]]:
    return [
        cls
        for _, cls in inspect.getmembers(ssh_exception, inspect.isclass)
        if issubclass(cls, BaseException) and cls.__module__ == ssh_exception.__name__
    ]


SOCKET_AND_TIMEOUT = [
    socket.gaierror, socket.herror, socket.timeout, TimeoutError, ConnectionRefusedError,
    ConnectionResetError, ConnectionAbortedError, BrokenPipeError, EOFError, OSError,
]  # fmt: skip


@pytest.mark.parametrize("exc_type", _paramiko_exceptions() + SOCKET_AND_TIMEOUT, ids=lambda c: c.__name__)
def test_every_exception_type_has_an_explicit_mapping(exc_type: type[BaseException]) -> None:
    assert exc_type in MAPPED, f"{exc_type.__name__} is not mapped in lenslab.remote.errmap.MAPPED"
    assert issubclass(MAPPED[exc_type], errors.RemoteError)


def _instance(exc_type: type[BaseException]) -> BaseException:
    key = paramiko.ECDSAKey.generate()
    special: dict[type[BaseException], BaseException] = {
        ssh_exception.BadAuthenticationType: ssh_exception.BadAuthenticationType("no", ["password"]),
        ssh_exception.BadHostKeyException: ssh_exception.BadHostKeyException("h", key, key),
        ssh_exception.ChannelException: ssh_exception.ChannelException(2, "refused"),
        ssh_exception.NoValidConnectionsError: ssh_exception.NoValidConnectionsError(
            {("127.0.0.1", 1): ConnectionRefusedError(111, "refused")}
        ),
        ssh_exception.PartialAuthentication: ssh_exception.PartialAuthentication(["password"]),
        ssh_exception.ProxyCommandFailure: ssh_exception.ProxyCommandFailure("nc", "boom"),
    }
    return special.get(exc_type) or exc_type("boom")


@pytest.mark.parametrize("exc_type", _paramiko_exceptions() + SOCKET_AND_TIMEOUT, ids=lambda c: c.__name__)
def test_raising_inside_the_edge_leaves_as_the_mapped_lenslab_error(exc_type: type[BaseException]) -> None:
    original = _instance(exc_type)
    with pytest.raises(errors.RemoteError) as caught, ssh_errors(WHERE):
        raise original
    assert type(caught.value) is MAPPED[exc_type]
    assert caught.value.__cause__ is original
    assert "\n" not in str(caught.value)


def test_changed_host_key_names_both_fingerprints_and_the_reset_command() -> None:
    pinned, offered = paramiko.ECDSAKey.generate(), paramiko.ECDSAKey.generate()
    err = translate(ssh_exception.BadHostKeyException("[box.example]:2222", offered, pinned), WHERE)
    assert str(err) == (
        f"host key of [box.example]:2222 changed: pinned {hostkeys.fingerprint(pinned)}, "
        f"box now offers {hostkeys.fingerprint(offered)}; if the box was rebuilt, forget the old key "
        "with: ssh-keygen -R '[box.example]:2222' -f /k/known_hosts"
    )


def test_refused_authentication_says_which_key_to_authorize() -> None:
    err = translate(ssh_exception.AuthenticationException("Authentication failed."), WHERE)
    assert str(err) == (
        "debian@box.example:2222 refused key /k/id; add /k/id.pub to ~/.ssh/authorized_keys on the box, "
        "or set box.identity_file in lenslab.toml"
    )
