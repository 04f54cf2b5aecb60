"""`lenslab-box serve --no-sshd`: on the provider's stock image the image's own sshd (root, port
22) is how lenslab logs in, so serve starts none, may run as root, and still prepares the root,
keeps the watcher and stops cleanly on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

AS_ROOT = "import os, sys; os.getuid = lambda: 0; from lenslab_workspace.box.cli import main; sys.exit(main())"


def test_serve_without_sshd_runs_as_root_and_starts_no_sshd(tmp_path: Path) -> None:
    root = tmp_path / "lab"
    env = {k: v for k, v in os.environ.items() if k not in ("PUBLIC_KEY", "LENSLAB_PUBLIC_KEY")}
    server = subprocess.Popen([sys.executable, "-c", AS_ROOT, "--root", str(root), "serve", "--no-sshd"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not (root / ".lenslab" / "autostop.log").exists():  # the watcher was started
            assert server.poll() is None, server.communicate()
            assert time.monotonic() < deadline, "serve did not start its watcher"
            time.sleep(0.1)
        assert all((root / sub).is_dir() for sub in ("workspace", "checkpoints", "hf-cache", "runs"))
        assert not (root / ".lenslab" / "ssh").exists()  # no sshd files: the image's sshd serves
    finally:
        server.send_signal(signal.SIGTERM)
        _out, err = server.communicate(timeout=30)
    assert server.returncode == 0, err
    assert "nobody can log in" not in err
