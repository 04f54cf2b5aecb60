"""The HTTP plumbing and injectable faults shared by the RunPod and vast.ai emulators.

A subclass implements ``handle(method, path, query, auth, body) -> Reply | DROP``; this class
serves it on 127.0.0.1 and applies the faults every provider can show, before ``handle`` runs:
a fixed latency per call, a storm of 429s with ``Retry-After``, raw replies of any shape
(HTML with 200, ``null``, a list) and, in ``handle``, a dropped reply after a create (``DROP``:
the connection closes with nothing written, as when a reply is lost).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit


@dataclass
class Reply:
    status: int
    body: Any = None  # JSON-able; or bytes sent as they are
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


DROP = Reply(-1)  # close the connection without a reply
E = TypeVar("E", bound="HttpEmulator")


@dataclass
class Injected:
    reply: Reply
    path_prefix: str  # only requests whose path starts with this


class HttpEmulator:
    def __init__(self, api_key: str) -> None:
        self.api_key = api_key
        self.latency_seconds = 0.0  # added to every call (benchmarks)
        self.throttled = 0  # the next N calls get 429
        self.retry_after = "0.01"  # the Retry-After those 429s carry ("" for none)
        self.injected: list[Injected] = []
        # (method, full path with query string, Authorization header) of every request.
        self.requests: list[tuple[str, str, str]] = []
        self._lock = threading.RLock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    @property
    def origin(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self: E) -> E:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def throttle(self, times: int, retry_after: str = "0.01") -> None:
        """A 429 storm: the next ``times`` calls are refused with ``Retry-After: retry_after``."""
        self.throttled, self.retry_after = times, retry_after

    def inject(self, reply: Reply, times: int = 1, path_prefix: str = "") -> None:
        """The next ``times`` calls under ``path_prefix`` get ``reply`` instead of an answer."""
        self.injected.extend(Injected(reply, path_prefix) for _ in range(times))

    def authorized(self, auth: str) -> bool:
        return auth == f"Bearer {self.api_key}"

    def handle(self, method: str, path: str, query: dict[str, str], auth: str, body: Any) -> Reply:
        raise NotImplementedError

    def _serve(self, method: str, target: str, auth: str, raw: bytes) -> Reply:
        if self.latency_seconds:
            time.sleep(self.latency_seconds)  # outside the lock: calls overlap as on a real API
        with self._lock:
            self.requests.append((method, target, auth))
            if self.throttled > 0:
                self.throttled -= 1
                headers = {"Retry-After": self.retry_after} if self.retry_after else {}
                return Reply(429, {"error": "Too Many Requests"}, headers=headers)
            parts = urlsplit(target)
            for index, injected in enumerate(self.injected):
                if parts.path.startswith(injected.path_prefix):
                    del self.injected[index]
                    return injected.reply
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                return Reply(400, {"error": "body is not JSON"})
            return self.handle(method, parts.path, dict(parse_qsl(parts.query)), auth, body)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        emulator = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK wait

            def _respond(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                reply = emulator._serve(self.command, self.path, self.headers.get("Authorization") or "", raw)
                if reply is DROP:
                    self.close_connection = True
                    return
                data = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
                if reply.status == 204:
                    data = b""
                self.send_response(reply.status)
                self.send_header("Content-Type", reply.content_type)
                self.send_header("Content-Length", str(len(data)))
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _respond

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler
