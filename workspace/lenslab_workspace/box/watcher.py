"""The idle and budget watcher of a container box: a child of ``lenslab-box serve``.

The watcher is lenslab's ``provision/autostop.py`` (standard library only, shipped in the
lenslab package), run as the box user. It starts before the laptop wrote its settings
(``.lenslab/autostop.json`` under the persistent root, beside the provider's API key; both mode
600) and reads them again at every check, so ``lenslab up`` turns it on, changes it and turns it
off without a restart. Its state (``.lenslab/autostop-state.json``) is what ``lenslab status``
shows. When it exits (it should not), ``ensure`` starts it again, at most every
``RESTART_SECONDS``.
"""

from __future__ import annotations

import math
import subprocess
import sys
import time
from pathlib import Path

from lenslab import contract
from lenslab_workspace.box.layout import state_dir

SETTINGS_FILE = "autostop.json"
LOG_FILE = "autostop.log"
RESTART_SECONDS = 30.0
STOP_SECONDS = 5.0


def script() -> Path:
    """provision/autostop.py as the lenslab package ships it (package data beside the contract)."""
    return Path(contract.__file__).resolve().parent / "provision" / "autostop.py"


def command(root: Path) -> list[str]:
    return [sys.executable, str(script()), "--config", str(state_dir(root) / SETTINGS_FILE), "--wait"]


class Watcher:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.child: subprocess.Popen[bytes] | None = None
        self.started = -math.inf

    def ensure(self) -> None:
        """Start the watcher, or start it again after it exited."""
        if self.child is not None and self.child.poll() is None:
            return
        if time.monotonic() - self.started < RESTART_SECONDS:
            return
        self.started = time.monotonic()
        log_dir = state_dir(self.root)
        log_dir.mkdir(parents=True, exist_ok=True)
        with open(log_dir / LOG_FILE, "ab") as log:
            self.child = subprocess.Popen(command(self.root), stdin=subprocess.DEVNULL, stdout=log, stderr=log)

    def stop(self) -> None:
        child = self.child
        if child is None or child.poll() is not None:
            return
        child.terminate()
        try:
            child.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            child.kill()
