"""Debian's headless Chromium, run on a file, with every web request sent to a recording proxy."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
from pathlib import Path
from types import TracebackType

FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--hide-scrollbars", "--disable-extensions", "--disable-default-apps",
    "--disable-domain-reliability", "--disable-client-side-phishing-detection", "--no-pings",
    "--safebrowsing-disable-auto-update", "--bwsi", "--disable-features=NetworkTimeServiceQuerying,OptimizationHints",
)  # fmt: skip


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        raise AssertionError(
            "chromium is missing; install the Debian package `chromium` (tests/services/start.sh does)"
        )
    return found


# Chromium's own services (component updater, sign-in, network time) that it calls whatever
# page it shows, even with background networking disabled; any other request came from the page.
BROWSER_OWN_HOSTS = ("update.googleapis.com", "accounts.google.com", "clients2.google.com")


def _host(request_line: str) -> str:
    target = request_line.split(" ")[1] if " " in request_line else ""
    return target.split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0]


class RecordingProxy:
    """A proxy on 127.0.0.1 that answers nothing and records the first line of every request."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        self._server = socket.socket()
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(16)
        self.port = self._server.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    first = conn.recv(4096).split(b"\r\n", 1)[0].decode("latin-1")
                except OSError:
                    first = "?"
                self.requests.append(first)

    @property
    def page_requests(self) -> list[str]:
        return [line for line in self.requests if _host(line) not in BROWSER_OWN_HOSTS]

    def __enter__(self) -> RecordingProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: tuple[type[BaseException] | None, BaseException | None, TracebackType | None]) -> None:
        self._server.close()


def run(page: Path, profile: Path, proxy: RecordingProxy, *action: str, fragment: str = "") -> str:
    """Open ``page`` (``#fragment``) and do ``action`` (--dump-dom, --screenshot=...); stdout."""
    result = subprocess.run(
        [chromium(), *FLAGS, f"--user-data-dir={profile}", f"--proxy-server=http://127.0.0.1:{proxy.port}",
         "--proxy-bypass-list=<-loopback>", "--window-size=1200,1800", *action,
         page.resolve().as_uri() + (f"#{fragment}" if fragment else "")],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout
