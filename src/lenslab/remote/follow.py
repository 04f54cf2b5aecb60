"""Following a training container's log across dropped links and container restarts.

Each (re)connection asks Docker for the log since the last line printed (``timestamps=True``
gives every line its time), so nothing is printed twice and nothing is skipped. The stream
also ends when the container exits; when Docker is restarting it, following goes on.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import datetime, timezone
from typing import IO, TYPE_CHECKING, Any

from lenslab.errors import ConnectionLost, HostUnreachable
from lenslab.remote.engine import engine_errors
from lenslab.remote.lab import find
from lenslab.remote.training import ACTIVE, container_name

if TYPE_CHECKING:
    from lenslab.cli.labctx import LabSession

# How long `logs -f` keeps trying to get the link back before giving up.
RECONNECT_SECONDS = 300.0
INITIAL_BACKOFF_SECONDS = 0.5
MAX_BACKOFF_SECONDS = 10.0
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
        open_session: Callable[[], AbstractContextManager[LabSession]],
        name: str,
        out: IO[bytes] | None = None,
        on_reconnect: Callable[[str], None] | None = None,
    ) -> None:
        self.open_session = open_session
        self.name = name
        self.out = out or sys.stdout.buffer
        self.on_reconnect = on_reconnect or (lambda text: None)
        self.last: Stamp | None = None
        self._partial = b""

    def run(self, follow: bool) -> int:
        """0 when the log ended (the run stopped, or the whole log was printed without -f)."""
        backoff = INITIAL_BACKOFF_SECONDS
        lost_since: float | None = None
        while True:
            try:
                with self.open_session() as session:
                    backoff, lost_since = INITIAL_BACKOFF_SECONDS, None
                    if not self._stream(session, follow):
                        return 0
            except (ConnectionLost, HostUnreachable) as exc:
                lost_since = lost_since or time.monotonic()
                if time.monotonic() - lost_since > RECONNECT_SECONDS:
                    raise
                self.on_reconnect(f"lost the link to the box ({exc.message}); reconnecting")
                time.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)

    def _stream(self, session: LabSession, follow: bool) -> bool:
        """Print what is new; True when following should go on (the container is still active)."""
        container = find(session.client, container_name(self.name))
        if container is None:
            self._print_log_file(session)
            return False
        since = self.last[0] if self.last else None
        with engine_errors():
            for chunk in container.logs(stream=True, follow=follow, timestamps=True, since=since):
                self._feed(chunk)
            container.reload()
        # A link that broke mid-stream can also just end it; the check above then fails or
        # finds the container still active, and we go round again.
        return follow and container.status in ACTIVE

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
        path = f"{session.lab.root}/runs/{self.name}/train.log"
        getter: Any = getattr(session.runner, "get", None)
        if getter is not None and not self.last:
            self.out.write(getter(path))
            self.out.flush()
