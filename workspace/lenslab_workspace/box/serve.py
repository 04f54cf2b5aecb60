"""``lenslab-box serve``: a container box's start command.

It prepares the persistent root, runs sshd unprivileged (the image's user, port 2222, public
keys only, the host key kept on the volume so a new instance on the same volume shows the same
key), starts again the runs that were meant to run when the container stopped, reaps every
orphan (it is the container's first process, or its subreaper), keeps the idle and budget
watcher running (box/watcher.py), and on SIGTERM stops each supervised run gracefully (they
checkpoint) before it exits.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from lenslab.contract import STOP_TIMEOUT_SECONDS
from lenslab_workspace.box import supervisor, watcher
from lenslab_workspace.box.layout import BoxError, prepare, state_dir

DEFAULT_SSH_PORT = 2222
SSHD = "/usr/sbin/sshd"
_KEY_LINE = re.compile(r"(ssh-|ecdsa-|sk-)[A-Za-z0-9@.-]+ [A-Za-z0-9+/=]+( [ -~]{0,200})?")
_PR_SET_CHILD_SUBREAPER = 36


def public_keys() -> list[str]:
    """The authorized_keys lines the provider passed (LENSLAB_PUBLIC_KEY, or RunPod's PUBLIC_KEY)."""
    found = []
    for var in ("LENSLAB_PUBLIC_KEY", "PUBLIC_KEY"):
        for line in os.environ.get(var, "").replace("\\n", "\n").splitlines():
            line = line.strip()
            if not line:
                continue
            if not _KEY_LINE.fullmatch(line):
                raise BoxError(f"{var} holds something that is not an OpenSSH public key line", 2)
            if line not in found:
                found.append(line)
    return found


def ssh_port() -> int:
    text = os.environ.get("LENSLAB_SSH_PORT", str(DEFAULT_SSH_PORT))
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise BoxError(f"LENSLAB_SSH_PORT={text!r} is not a port (1-65535)", 2)
    return int(text)


def write_sshd_files(root: Path, keys: list[str], port: int) -> Path:
    """Host key (kept), authorized_keys and sshd_config (rewritten) under .lenslab/ssh/."""
    ssh_dir = state_dir(root) / "ssh"
    ssh_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(ssh_dir, 0o700)
    host_key = ssh_dir / "ssh_host_ed25519_key"
    if not host_key.is_file():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "lenslab-box", "-f", str(host_key)],
                       check=True, stdin=subprocess.DEVNULL)  # fmt: skip
    os.chmod(host_key, 0o600)
    authorized = ssh_dir / "authorized_keys"
    authorized.write_text("".join(f"{key}\n" for key in keys))
    os.chmod(authorized, 0o600)
    venv_bin = str(Path(sys.executable).parent)
    path = f"{venv_bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    config = ssh_dir / "sshd_config"
    config.write_text("\n".join([
        f"Port {port}", f"HostKey {host_key}", f"AuthorizedKeysFile {authorized}",
        f"PidFile /tmp/lenslab-sshd-{port}.pid",  # not on the volume, which another instance may mount
        "PubkeyAuthentication yes", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
        "PermitRootLogin no", f"AllowUsers {pwd.getpwuid(os.getuid()).pw_name}", "UsePAM no",
        # The volume's directories may be group-writable (network volumes often are); the
        # files sshd reads are written here with mode 600 in a 700 directory.
        "StrictModes no", "X11Forwarding no", "AllowTcpForwarding yes", "PrintMotd no",
        "Subsystem sftp internal-sftp",
        # Login sessions get the image's environment, which sshd does not pass on by itself.
        f"SetEnv PATH={path} LENSLAB_ROOT={root} HF_HOME={os.environ.get('HF_HOME', root / 'hf-cache')}",
    ]) + "\n")  # fmt: skip
    return config


class Server:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.stopping = False
        self.sshd: subprocess.Popen[bytes] | None = None
        self.watcher = watcher.Watcher(root)  # idle and budget: stops the instance

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True

    def run(self) -> int:
        keys = public_keys()
        port = ssh_port()
        with contextlib.suppress(OSError, AttributeError):
            # Orphans (the runs' supervisors, whose starter left) come to this process to be reaped.
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        prepare(self.root)
        config = write_sshd_files(self.root, keys, port)
        if not keys:
            _say("no LENSLAB_PUBLIC_KEY or PUBLIC_KEY set: nobody can log in over SSH")
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        self.sshd = self._start_sshd(config)
        resumed = supervisor.resume_desired(self.root)
        if resumed:
            _say(f"resumed runs: {', '.join(resumed)}")
        while not self.stopping:
            self._reap()
            self.watcher.ensure()
            if self.sshd.poll() is not None and not self.stopping:
                _say(f"sshd exited ({self.sshd.returncode}); starting it again")
                time.sleep(1)
                self.sshd = self._start_sshd(config)
            time.sleep(0.5)
        return self._shutdown()

    def _start_sshd(self, config: Path) -> subprocess.Popen[bytes]:
        return subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdin=subprocess.DEVNULL)

    def _reap(self) -> None:
        while True:
            try:
                pid, _status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.sshd is not None and pid == self.sshd.pid:
                self.sshd.returncode = -1  # reaped here: Popen must not wait for it again

    def _shutdown(self) -> int:
        """Every run checkpoints and stops (its desired state stays: the next start resumes it)."""
        self.watcher.stop()
        pids = supervisor.signal_all(self.root)
        if pids:
            _say(f"stopping {len(pids)} run(s) gracefully")
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS + 10
        while time.monotonic() < deadline and any(_running(pid) for pid in pids):
            self._reap()
            time.sleep(0.2)
        if self.sshd is not None and self.sshd.poll() is None:
            self.sshd.terminate()
        self._reap()
        return 0


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[:1] != ["Z"]
    except OSError:
        return False


def _say(text: str) -> None:
    print(f"lenslab-box serve: {text}", file=sys.stderr, flush=True)
