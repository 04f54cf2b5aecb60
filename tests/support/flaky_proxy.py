"""An HTTP proxy on 127.0.0.1 that loses or spoils replies, in front of a cloud API emulator.

Every request is forwarded to the upstream server as is. A request matching a ``Fault``
(method and a regular expression on the path) is, for the fault's next ``times`` requests,
forwarded first (unless ``forward=False``: the request is then lost on the way in) and then
answered badly instead of with the upstream reply:

- ``"502"``: a gateway's HTML error page with HTTP 502;
- ``"reset"``: the connection is reset (RST) with no reply;
- ``"timeout"``: no reply at all until the client gives up (or the proxy stops);
- ``"replace"``: ``status``, ``content_type`` and ``body`` as given (HTML with 200, ``null``...).

``applied`` lists what was done, for assertions.
"""

from __future__ import annotations

import http.client
import re
import socket
import struct
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal
from urllib.parse import urlsplit

How = Literal["502", "reset", "timeout", "replace"]
GATEWAY_PAGE = b"<html><head><title>502 Bad Gateway</title></head><body>Bad Gateway</body></html>"


@dataclass
class Fault:
    method: str
    path: str  # regular expression, matched in full against the request path
    how: How
    times: int = 1
    forward: bool = True
    status: int = 200
    content_type: str = "application/json"
    body: bytes = b""


class FlakyProxy:
    def __init__(self, upstream_url: str) -> None:
        parts = urlsplit(upstream_url)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.api_path = parts.path.rstrip("/")
        self.faults: list[Fault] = []
        self.applied: list[tuple[str, str, How, bool]] = []  # (method, path, how, forwarded)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}{self.api_path}"

    def start(self) -> FlakyProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()

    def fail(self, method: str, path: str, how: How, times: int = 1, **options: Any) -> None:
        """Spoil the next ``times`` replies to ``method`` on a path matching ``path``."""
        self.faults.append(Fault(method, path, how, times, **options))

    def _take(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.times > 0 and fault.method == method and re.fullmatch(fault.path, path):
                    fault.times -= 1
                    self.applied.append((method, path, fault.how, fault.forward))
                    return fault
        return None

    def _forward(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, str, bytes]:
        conn = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            conn.request(method, path, body=body or None, headers=headers)
            response = conn.getresponse()
            return response.status, response.getheader("Content-Type", ""), response.read()
        finally:
            conn.close()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                path = urlsplit(self.path).path
                fault = proxy._take(self.command, path)
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("authorization", "content-type")}
                if fault is None or fault.forward:
                    status, content_type, payload = proxy._forward(self.command, self.path, headers, body)
                if fault is None:
                    self._reply(status, content_type, payload)
                elif fault.how == "502":
                    self._reply(502, "text/html", GATEWAY_PAGE)
                elif fault.how == "replace":
                    self._reply(fault.status, fault.content_type, fault.body)
                elif fault.how == "timeout":
                    proxy._stopping.wait(120)
                    self._reset()
                else:
                    self._reset()

            def _reply(self, status: int, content_type: str, payload: bytes) -> None:
                self.send_response(status)
                if content_type:
                    self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def _reset(self) -> None:
                # Linger 0: the close sends RST instead of FIN, as a dropped connection does. The
                # socket really closes once the handler's files are closed, before any FIN.
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
                self.close_connection = True

            do_GET = do_POST = do_DELETE = _serve

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler
