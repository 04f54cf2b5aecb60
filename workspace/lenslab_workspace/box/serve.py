"""``lenslab-box serve``: a container box's start command.

It prepares the persistent root, runs sshd unprivileged (the image's user, port 2222, public
keys only, the host key kept on the volume so a new instance on the same volume shows the same
key), starts again the runs that were meant to run when the container stopped, reaps every
orphan (it is the container's first process, or its subreaper), keeps the idle and budget
watcher running (box/watcher.py), and on SIGTERM stops each supervised run gracefully (they
checkpoint) before it exits.

With ``--no-sshd`` (the provider's stock image, where lenslab installed itself through the
image's own root sshd) it runs everything but sshd, as whatever user started it.
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
# A key type, its base64 blob and an optional comment: OpenSSH takes any text without a
# newline or NUL as the comment (``José@laptop`` included); control characters are refused here.
_KEY_LINE = re.compile(r"(ssh-|ecdsa-|sk-)[A-Za-z0-9@.-]+ [A-Za-z0-9+/=]+( [^\x00-\x1f\x7f]{0,200})?")
_PR_SET_CHILD_SUBREAPER = 36
# Seconds before each new start of an sshd that keeps exiting; one that ran this long is healthy.
SSHD_BACKOFF_SECONDS = (1, 2, 4, 8, 16, 32, 60)
SSHD_HEALTHY_SECONDS = 60.0


def public_keys() -> list[str]:
    """The authorized_keys lines the provider passed (LENSLAB_PUBLIC_KEY, or RunPod's PUBLIC_KEY).

    LENSLAB_PUBLIC_KEY is lenslab's own key: a bad line is an error. PUBLIC_KEY is RunPod's
    account-wide list, which lenslab does not control: a bad line there is skipped with a
    warning, since refusing it would leave a billing pod nobody can reach.
    """
    found = []
    for var in ("LENSLAB_PUBLIC_KEY", "PUBLIC_KEY"):
        lines = os.environ.get(var, "").replace("\\n", "\n").splitlines()
        for number, line in enumerate(lines, 1):
            line = line.strip()
            if not line:
                continue
            if not _KEY_LINE.fullmatch(line) or not line.isprintable():
                if var == "LENSLAB_PUBLIC_KEY":
                    raise BoxError(f"{var} holds something that is not an OpenSSH public key line", 2)
                _say(f"warning: skipped line {number} of {var}: not an OpenSSH public key line")
                continue
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
    def __init__(self, root: Path, sshd: bool = True) -> None:
        self.root = root
        # False on the provider's stock image: its own sshd (root, port 22) is how lenslab got
        # in to install lenslab-box at all, so this one starts none (and may run as root).
        self.with_sshd = sshd
        self.stopping = False
        self.sshd: subprocess.Popen[bytes] | None = None
        self.sshd_started = 0.0
        self.sshd_due: float | None = None  # when to start an exited sshd again
        self.sshd_failures = 0
        self.watcher = watcher.Watcher(root)  # idle and budget: stops the instance

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True

    def run(self) -> int:
        config = self._sshd_config()
        with contextlib.suppress(OSError, AttributeError):
            # Orphans (the runs' supervisors, whose starter left) come to this process to be reaped.
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        prepare(self.root)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        if config is not None:
            self._start_sshd(config)
        resumed = supervisor.resume_desired(self.root)
        if resumed:
            _say(f"resumed runs: {', '.join(resumed)}")
        while not self.stopping:
            self._reap()
            self.watcher.ensure()
            if config is not None:
                self.keep_sshd(config, time.monotonic())
            time.sleep(0.5)
        return self._shutdown()

    def _sshd_config(self) -> Path | None:
        """sshd's files under the root (checked before anything starts); None without sshd."""
        if not self.with_sshd:
            return None
        if os.getuid() == 0:
            # sshd_config allows no root login: as root nobody could log in.
            raise BoxError("serve runs as the image's unprivileged user, not root; set USER in the image", 2)
        keys = public_keys()
        port = ssh_port()
        prepare(self.root)
        config = write_sshd_files(self.root, keys, port)
        if not keys:
            _say("no LENSLAB_PUBLIC_KEY or PUBLIC_KEY set: nobody can log in over SSH")
        return config

    def keep_sshd(self, config: Path, now: float) -> None:
        """Start sshd again once it exited, after a delay that doubles while it keeps exiting
        (a broken config must not spin, nor fill the log)."""
        if self.stopping or self.sshd is None:
            return
        if self.sshd_due is not None:
            if now >= self.sshd_due:
                self._start_sshd(config, now)
            return
        if self.sshd.poll() is None:
            return
        if now - self.sshd_started >= SSHD_HEALTHY_SECONDS:
            self.sshd_failures = 0
        delay = SSHD_BACKOFF_SECONDS[min(self.sshd_failures, len(SSHD_BACKOFF_SECONDS) - 1)]
        self.sshd_failures += 1
        _say(f"sshd exited ({self.sshd.returncode}); starting it again in {delay}s")
        self.sshd_due = now + delay

    def _start_sshd(self, config: Path, now: float | None = None) -> None:
        self.sshd = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdin=subprocess.DEVNULL)
        self.sshd_started = time.monotonic() if now is None else now
        self.sshd_due = None

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
