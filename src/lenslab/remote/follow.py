"""Following a run's log across dropped links and restarts (its container's, or its trainer's).

Each (re)connection asks Docker for the log since the last line printed (``timestamps=True``
gives every line its time), so nothing is printed twice and nothing is skipped. The stream
also ends when the container exits; when Docker is restarting it, following goes on. On a box
without Docker, the backend counts the bytes of the run's log printed so far (``offset``).
"""

from __future__ import annotations

import re
import select
import shlex
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import datetime, timezone
from typing import TYPE_CHECKING, BinaryIO

from lenslab.contract import LOG_FILE
from lenslab.errors import CommandFailed, ConnectionLost, HostUnreachable, LenslabError
from lenslab.remote.errmap import ssh_errors
from lenslab.remote.training import ACTIVE, Paths, container_name

if TYPE_CHECKING:
    from lenslab.remote.bootstrap import Runner
    from lenslab.remote.labs import LabBackend
    from lenslab.remote.labsession import LabSession

# How long `logs -f` keeps trying to get the link back before giving up.
RECONNECT_SECONDS = 300.0
INITIAL_BACKOFF_SECONDS = 0.5
MAX_BACKOFF_SECONDS = 10.0
_READ_CHUNK = 32768
_SELECT_SECONDS = 0.2
_STAMP = re.compile(rb"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?Z ?")

Stamp = tuple[int, int]  # (unix seconds, nanoseconds)


def parse_line(raw: bytes) -> tuple[Stamp | None, bytes]:
    match = _STAMP.match(raw)
    if not match:
        return None, raw
    when = datetime.strptime(match[1].decode(), "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc)
    nanos = int((match[2] or b"0").decode().ljust(9, "0")[:9])
    return (int(when.timestamp()), nanos), raw[match.end() :]


class Follower:
    def __init__(
        self,
        open_session: Callable[[], AbstractContextManager[LabBackend]],
        name: str,
        out: BinaryIO | None = None,
        on_reconnect: Callable[[str], None] | None = None,
    ) -> None:
        self.open_session = open_session
        self.name = name
        self.out = out or sys.stdout.buffer
        self.on_reconnect = on_reconnect or (lambda text: None)
        self.last: Stamp | None = None
        self.offset = 0  # bytes of a process box's log printed so far
        self._partial = b""

    def run(self, follow: bool) -> int:
        """0 when the log ended (the run stopped, or the whole log was printed without -f)."""
        backoff = INITIAL_BACKOFF_SECONDS
        lost_since: float | None = None
        while True:
            try:
                with self.open_session() as session:
                    backoff, lost_since = INITIAL_BACKOFF_SECONDS, None
                    if not session.stream_log(self, follow):
                        return 0
            except (ConnectionLost, HostUnreachable) as exc:
                lost_since = lost_since or time.monotonic()
                if time.monotonic() - lost_since > RECONNECT_SECONDS:
                    raise
                self.on_reconnect(f"lost the link to the box ({exc.message}); reconnecting")
                time.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)

    def stream_docker(self, session: LabSession, follow: bool) -> bool:
        """Print what is new; True when following should go on (the container is still active)."""
        name = shlex.quote(container_name(self.name))
        # Asked first: the stream carries the container's stderr, so Docker's own "No such
        # container" would be printed as if it were the run's log.
        if session.runner.run(f"docker inspect {name} >/dev/null 2>&1").exit_status != 0:
            self._print_log_file(session)
            return False
        since = f"--since {self.last[0]} " if self.last else ""
        # The box's docker CLI does the log protocol; lenslab only streams its output.
        command = f"docker logs --timestamps {'--follow ' if follow else ''}{since}{name} 2>&1"
        if stream_command(session.runner, command, self._feed) != 0:
            self._print_log_file(session)
            return False
        state = session.runner.run(f"docker inspect -f '{{{{.State.Status}}}}' {name}").stdout.strip()
        return follow and state in ACTIVE

    def _feed(self, chunk: bytes) -> None:
        data = self._partial + chunk
        *lines, self._partial = data.split(b"\n")
        for raw in lines:
            stamp, text = parse_line(raw)
            if stamp is not None:
                if self.last is not None and stamp <= self.last:
                    continue  # printed before the reconnect
                self.last = stamp
            self.out.write(text + b"\n")
        self.out.flush()

    def _print_log_file(self, session: LabSession) -> None:
        """No container (the box was replaced, or the run was removed): the run's own log file."""
        if self.last:
            return  # the container's log was printed already
        try:
            session.runner.get(f"{Paths(session.lab.root, self.name).run_dir}/{LOG_FILE}", self.out)
        except CommandFailed:
            raise LenslabError(
                f"run {self.name} has no container and no log file on the box", "see the runs with `lenslab runs`"
            ) from None
        self.out.flush()


def stream_command(runner: Runner, command: str, sink: Callable[[bytes], None]) -> int:
    """Run ``command`` on the box, handing its output to ``sink`` as it arrives; its exit status.

    A link that dies mid-stream raises ``ConnectionLost`` (a closed channel with no exit status),
    rather than ending quietly like a finished command."""
    transport_of = getattr(runner, "_transport", None)
    if transport_of is None:  # the local provider
        result = runner.run(command, on_output=lambda stream, text: sink(text.encode()))
        return result.exit_status
    where = runner.target.where  # type: ignore[attr-defined]
    with ssh_errors(where):
        chan = transport_of().open_session()
        try:
            chan.set_combine_stderr(True)
            chan.exec_command(command)
            chan.shutdown_write()
            while True:
                if chan.recv_ready():
                    sink(chan.recv(_READ_CHUNK))
                    continue
                if chan.exit_status_ready() and not chan.recv_ready():
                    if chan.status_event.is_set() and chan.transport is not None and chan.transport.is_active():
                        return int(chan.recv_exit_status())
                    raise ConnectionLost("the SSH link to the box dropped")
                select.select([chan], [], [], _SELECT_SECONDS)
        finally:
            chan.close()
