"""The SSH link to a box (paramiko): connect with retries, run, put, get, forward a port.

``put`` and ``get`` stream in chunks over an exec channel (``cat``), so files of any size pass
with bounded memory and the box needs no SFTP server.

Every paramiko/socket call happens inside ``errmap.ssh_errors``, so callers only ever see
``lenslab.errors``. Host keys are verified against lenslab's pinned known_hosts
(``hostkeys.PinOnFirstUse`` only ever runs for a host with no key on file).
"""

from __future__ import annotations

import logging
import select
import shlex
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import paramiko

from lenslab.errors import AuthenticationRefused, CommandFailed, HostKeyChanged, LenslabError, RemoteError
from lenslab.records import OutputSink, RunResult
from lenslab.remote import hostkeys
from lenslab.remote.errmap import Where, ssh_errors
from lenslab.remote.transfer import TRANSFER_CHUNK, Sink, Source, Writer, open_sink, open_source

# paramiko's transport thread logs the failures it also raises (a bad banner, with a traceback);
# with no handler Python prints those on stderr. lenslab reports them once, as one line.
logging.getLogger("paramiko").addHandler(logging.NullHandler())

# A box that is still booting refuses connections or drops the banner for a while; these bound
# how long `up` waits for it. Authentication and host-key errors are never retried.
CONNECT_ATTEMPTS = 6
INITIAL_BACKOFF_SECONDS = 1.0
MAX_BACKOFF_SECONDS = 10.0
CONNECT_TIMEOUT_SECONDS = 10.0
# Below typical NAT/firewall idle timeouts, so long-running commands keep their session.
KEEPALIVE_SECONDS = 30
_READ_CHUNK = 32768
_SELECT_SECONDS = 0.2
_STDERR_TAIL = 8192  # bytes of a transfer's stderr kept for its error message


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    user: str
    identity_file: Path
    known_hosts: Path
    expected_fingerprint: str | None = None

    @property
    def where(self) -> Where:
        return Where(self.host, self.port, self.user, self.identity_file, self.known_hosts)


class SSHLink:
    def __init__(self, client: paramiko.SSHClient, target: Target) -> None:
        self._client = client
        self.target = target

    @classmethod
    def connect(
        cls,
        target: Target,
        *,
        attempts: int = CONNECT_ATTEMPTS,
        timeout: float = CONNECT_TIMEOUT_SECONDS,
        on_retry: Callable[[int, RemoteError], None] | None = None,
    ) -> SSHLink:
        backoff = INITIAL_BACKOFF_SECONDS
        for attempt in range(1, attempts + 1):
            try:
                return cls(_open_client(target, timeout), target)
            except (AuthenticationRefused, HostKeyChanged):
                raise
            except RemoteError as exc:
                if attempt == attempts:
                    raise
                if on_retry:
                    on_retry(attempt, exc)
                time.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)
        raise AssertionError("unreachable: the loop returns or raises")

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> SSHLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(
        self,
        command: str,
        *,
        stdin: bytes | None = None,
        on_output: OutputSink | None = None,
        check: bool = False,
    ) -> RunResult:
        """Run ``command`` in the login user's shell, streaming output to ``on_output``."""
        out: list[bytes] = []
        err: list[bytes] = []
        with ssh_errors(self.target.where):
            chan = self._transport().open_session()
            try:
                chan.exec_command(command)
                if stdin is not None:
                    chan.sendall(stdin)
                chan.shutdown_write()
                while True:
                    drained = _drain(chan, out, err, on_output)
                    if not drained and chan.exit_status_ready() and chan.eof_received:
                        break
                    if not drained and chan.closed and not chan.status_event.is_set():
                        # The link died mid-command: select() on a closed channel returns at
                        # once, so waiting for an EOF that never comes would spin.
                        raise paramiko.SSHException("the SSH session closed during the command")
                    if not drained:
                        select.select([chan], [], [], _SELECT_SECONDS)
                status = chan.recv_exit_status()
            finally:
                chan.close()
        result = RunResult(status, b"".join(out).decode(errors="replace"), b"".join(err).decode(errors="replace"))
        if check and status != 0:
            first = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()[-1]
            raise CommandFailed(f"`{command}` exited {status} on the box: {first}", status)
        return result

    def put(self, source: Source, remote_path: str, mode: int = 0o644) -> None:
        """Write ``source`` (bytes, a local file or a binary stream) to ``remote_path``
        atomically, in chunks, so a large file never sits in memory (plain shell: no SFTP)."""
        path = shlex.quote(remote_path)
        tmp = shlex.quote(remote_path + ".lenslab-tmp")
        # umask 077 in a subshell: the file is private from its first byte (a secret is never
        # briefly readable by others, nor left so by an interrupted upload); chmod then widens it.
        command = (
            f'mkdir -p "$(dirname {path})" && (umask 077 && cat > {tmp}) && chmod {mode:o} {tmp} && mv -f {tmp} {path}'
        )
        with open_source(source) as reader:
            status, err = self._stream(command, stdin=reader, stdout=None)
        if status != 0:
            last = (err.strip() or "no output").splitlines()[-1]
            raise CommandFailed(f"`{command}` exited {status} on the box: {last}", status)

    def get(self, remote_path: str, dest: Sink) -> int:
        """Copy ``remote_path`` into ``dest`` (a local path or a binary stream) in chunks, as it
        arrives; the number of bytes."""
        with open_sink(dest) as writer:
            counter = _Counting(writer)
            status, err = self._stream(f"cat -- {shlex.quote(remote_path)}", stdin=None, stdout=counter)
        if status != 0:
            raise CommandFailed(f"cannot read {remote_path} on the box: {err.strip()}", status)
        return counter.count

    def _stream(self, command: str, *, stdin: BinaryIO | None, stdout: Writer | None) -> tuple[int, str]:
        """Run ``command``, feeding ``stdin`` and writing its stdout to ``stdout`` chunk by chunk;
        (exit status, the tail of its stderr). Memory stays at a few chunks plus the channel's window."""
        err = bytearray()
        with ssh_errors(self.target.where):
            chan = self._transport().open_session()
            try:
                chan.exec_command(command)
                if stdin is not None:
                    _feed(chan, stdin)
                if not chan.closed:
                    chan.shutdown_write()
                while True:
                    moved = _pump_out(chan, stdout, err)
                    if not moved and chan.exit_status_ready() and chan.eof_received:
                        break
                    if not moved and chan.closed and not chan.status_event.is_set():
                        raise paramiko.SSHException("the SSH session closed during the transfer")
                    if not moved:
                        select.select([chan], [], [], _SELECT_SECONDS)
                status = chan.recv_exit_status()
            finally:
                chan.close()
        return status, err.decode(errors="replace")

    def forward(self, local_port: int, remote_host: str, remote_port: int) -> Forward:
        """Listen on 127.0.0.1:``local_port`` and tunnel each connection to the box's side."""
        return Forward(self, local_port, remote_host, remote_port)

    def _transport(self) -> paramiko.Transport:
        transport = self._client.get_transport()
        if transport is None or not transport.is_active():
            raise paramiko.SSHException("the SSH session is closed")
        return transport


def load_key(path: Path) -> paramiko.PKey:
    """The private key, or a one-line error; paramiko reports unusable keys as ValueError,
    TypeError or SSHException depending on the format, none of which names the file."""
    try:
        return paramiko.PKey.from_path(path)
    except (OSError, ValueError, TypeError, paramiko.SSHException) as exc:
        if isinstance(exc, (TypeError, paramiko.PasswordRequiredException)):
            raise AuthenticationRefused(
                f"key {path} is protected by a passphrase, which lenslab cannot ask for",
                "point box.identity_file at a key without one, e.g. lenslab's own (lenslab init)",
            ) from exc
        raise AuthenticationRefused(
            f"cannot read private key {path} ({type(exc).__name__})",
            "point box.identity_file at an OpenSSH private key (ed25519, ecdsa or rsa)",
        ) from exc


def _open_client(target: Target, timeout: float) -> paramiko.SSHClient:
    key = load_key(target.identity_file)
    client = paramiko.SSHClient()
    with ssh_errors(target.where):
        try:
            if target.known_hosts.exists():
                # Not load_host_keys(): that would make paramiko rewrite the file on its own.
                client.get_host_keys().load(str(target.known_hosts))
            client.set_missing_host_key_policy(hostkeys.PinOnFirstUse(target.known_hosts, target.expected_fingerprint))
            client.connect(
                target.host,
                port=target.port,
                username=target.user,
                pkey=key,
                look_for_keys=False,
                allow_agent=False,
                timeout=timeout,
                banner_timeout=timeout,
                auth_timeout=timeout,
            )
            transport = client.get_transport()
            if transport is not None:
                transport.set_keepalive(KEEPALIVE_SECONDS)
        except BaseException:
            client.close()
            raise
    return client


def _feed(chan: paramiko.Channel, reader: BinaryIO) -> None:
    """Send ``reader`` to the command. One that exits before reading it all (a full disk, a
    path it cannot write) closes the channel: feeding stops, and its exit status and stderr,
    read next, say why, instead of a broken-pipe error naming the link."""
    while chunk := _read_local(reader):
        try:
            chan.sendall(chunk)
        except (OSError, EOFError, paramiko.SSHException):
            if chan.closed and chan.status_event.is_set():
                return
            raise


def _pump_out(chan: paramiko.Channel, stdout: Writer | None, err: bytearray) -> bool:
    """Move what has arrived: stdout to the local sink, stderr into a bounded tail."""
    moved = False
    while chan.recv_ready():
        chunk = chan.recv(_READ_CHUNK)
        if not chunk:
            break
        moved = True
        if stdout is not None:
            _write_local(stdout, chunk)
    while chan.recv_stderr_ready():
        chunk = chan.recv_stderr(_READ_CHUNK)
        if not chunk:
            break
        moved = True
        err.extend(chunk)
        del err[:-_STDERR_TAIL]
    return moved


def _read_local(reader: BinaryIO) -> bytes:
    # Local I/O errors are the laptop's, not the link's: errmap would call an OSError "unreachable".
    try:
        return reader.read(TRANSFER_CHUNK)
    except OSError as exc:
        raise LenslabError(f"cannot read the local file to upload ({exc.strerror})") from exc


def _write_local(writer: Writer, chunk: bytes) -> None:
    try:
        writer.write(chunk)
    except OSError as exc:
        raise LenslabError(f"cannot write the downloaded file here ({exc.strerror})", "free some disk space") from exc


class _Counting:
    """A binary writer that counts what passes through it."""

    def __init__(self, inner: Writer) -> None:
        self.inner = inner
        self.count = 0

    def write(self, data: bytes, /) -> object:
        self.count += len(data)
        return self.inner.write(data)


def _drain(chan: paramiko.Channel, out: list[bytes], err: list[bytes], sink: OutputSink | None) -> bool:
    drained = False
    for ready, recv, buf, stream in (
        (chan.recv_ready, chan.recv, out, "stdout"),
        (chan.recv_stderr_ready, chan.recv_stderr, err, "stderr"),
    ):
        while ready():
            chunk = recv(_READ_CHUNK)
            if not chunk:
                break
            buf.append(chunk)
            drained = True
            if sink:
                sink(stream, chunk.decode(errors="replace"))
    return drained


class Forward:
    """A local port forward; closes its listener when the ``with`` block ends."""

    def __init__(self, link: SSHLink, local_port: int, remote_host: str, remote_port: int) -> None:
        self._link = link
        self._remote = (remote_host, remote_port)
        self._server = socket.create_server(("127.0.0.1", local_port))
        self.local_port: int = self._server.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    def __enter__(self) -> Forward:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        self._server.close()
        self._thread.join(timeout=2)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self._server], [], [], _SELECT_SECONDS)
                if not ready:
                    continue
                conn, peer = self._server.accept()
            except OSError:
                return  # listener closed
            threading.Thread(target=self._pump, args=(conn, peer), daemon=True).start()

    def _pump(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        try:
            chan = self._link._transport().open_channel("direct-tcpip", self._remote, peer)
        except (paramiko.SSHException, OSError):
            # Nothing to report to: the local client sees its connection close.
            conn.close()
            return
        watched: list[Any] = [conn, chan]
        with conn, chan:
            while not self._stop.is_set():
                ready, _, _ = select.select(watched, [], [], _SELECT_SECONDS)
                if conn in ready:
                    data = conn.recv(_READ_CHUNK)
                    if not data:
                        return
                    chan.sendall(data)
                if chan in ready:
                    data = chan.recv(_READ_CHUNK)
                    if not data:
                        return
                    conn.sendall(data)
