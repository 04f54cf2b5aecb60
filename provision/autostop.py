#!/usr/bin/env python3
"""lenslab autostop: stop a box that nobody uses, so a forgotten box does not burn money.

Runs on the box as root (standard library only). The box counts as idle only when all hold:
- no authenticated SSH session (VSCode's Remote-SSH included): counted from sshd's per-session
  processes, so a connection that never logs in (an internet scanner) keeps nothing up. A process's
  name and title are its owner's to choose, so a session counts only when the installed sshd
  program runs it and a root-owned sshd is its parent (see is_real_session): no unprivileged user
  can keep the box up by posing as one. Reading other users' /proc/PID/exe takes root's
  CAP_SYS_PTRACE; without it no session counts;
- no running lenslab training container of this box (labels ``lenslab.role=train`` and, when
  configured, ``lenslab.box=<name>``);
- every GPU's utilisation is under the threshold;
- no Jupyter kernel is busy.
After ``idle_minutes`` of that, it stops lenslab's training containers gracefully (SIGTERM: they
write a checkpoint) and then takes the configured action: ``lambda-terminate`` (terminate this
instance through the Lambda Cloud API with the root-only key file), ``poweroff``, or ``none``.
With ``budget_usd`` set, reaching it does the same at once, busy or not.

State, for ``lenslab status`` (time left before autostop): the JSON file ``state_file``.

    autostop.py --config /etc/lenslab/autostop.json [--once]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from typing import Any, NamedTuple

CHECK_EVERY_SECONDS = 60.0
# Equal to lenslab.contract.STOP_TIMEOUT_SECONDS (this script runs alone on the box and cannot
# import it; a test keeps the two equal): enough for a final checkpoint of a large SAE.
STOP_TIMEOUT_SECONDS = 120
# Labels lenslab puts on its training and dev containers (lenslab.contract: ROLE_LABEL).
TRAIN_LABEL = "lenslab.role=train"
DEV_LABEL = "lenslab.role=dev"
# After authentication OpenSSH's per-connection process renames itself "sshd: USER@pts/N" (a
# terminal), "sshd: USER@notty" (VSCode, scp, `ssh box cmd`) or "sshd: USER" (no session yet, or
# port forwarding only, as `lenslab jupyter`); from OpenSSH 9.8 that process is sshd-session and
# its title starts "sshd-session: ". Before authentication every title carries a bracketed tag:
# "sshd: [accepted]", "sshd: [net]", "sshd: USER [priv]", "sshd: USER [net]", "... [preauth]".
SSHD_PROGRAMS = ("sshd", "sshd-session")
SESSION_TITLE = re.compile(r"(?:sshd|sshd-session): [^\s\[\]@]+(?:@(?:pts/[0-9]+|notty))?")
# The root-owned monitor that forks a non-root user's session process.
MONITOR_TITLE = re.compile(r"(?:sshd|sshd-session): [^\s\[\]@]+ \[priv\]")
# Where Debian/Ubuntu and other distributions install OpenSSH's server programs.
SSHD_PATHS = ("/usr/sbin/sshd", "/usr/lib/openssh/sshd-session", "/usr/libexec/openssh/sshd-session",
              "/usr/libexec/sshd-session")  # fmt: skip

FileId = tuple[int, int]  # (st_dev, st_ino): the same file whatever name or mount it is reached by


class Process(NamedTuple):
    pid: int
    ppid: int
    uid: int  # real uid
    euid: int
    program: str  # comm: the basename of what was exec'd, so anyone can choose it
    cmdline: bytes  # argv: its owner writes it freely
    exe: FileId | None  # the executable file itself (readable with root's CAP_SYS_PTRACE)


def is_session(program: str, cmdline: bytes) -> bool:
    """A process titled like an authenticated SSH session: sshd's name with a USER or USER@TTY
    title. Only a first filter: its owner chooses both the name and the title."""
    return program in SSHD_PROGRAMS and SESSION_TITLE.fullmatch(_title(cmdline)) is not None


def is_real_session(process: Process, parent: Process | None, sshd_files: set[FileId]) -> bool:
    """An authenticated SSH session that no unprivileged user can fake: the session title, the
    installed sshd program running it, and a root-owned sshd parent. A user can neither create a
    root process nor pick their process's parent; an orphan is adopted by PID 1, which in a
    container may be sshd itself, so a non-root session's parent must be the ``[priv]`` monitor
    (a root process's title is root's to write)."""
    if not is_session(process.program, process.cmdline) or process.exe not in sshd_files:
        return False
    if parent is None or parent.pid != process.ppid or (parent.uid, parent.euid) != (0, 0):
        return False
    if parent.exe not in sshd_files:
        return False
    # A root-owned session process is root's own doing, whatever sshd process forked it.
    return process.uid == 0 or MONITOR_TITLE.fullmatch(_title(parent.cmdline)) is not None


def read_process(proc: str, pid: int) -> Process | None:
    """One process's facts, or None when it ended (or ends) while we read them."""
    try:
        with open(f"{proc}/{pid}/stat", "rb") as handle:
            ppid = int(handle.read().rsplit(b")", 1)[1].split()[1])
        with open(f"{proc}/{pid}/status", "rb") as handle:
            uids = next(line for line in handle if line.startswith(b"Uid:")).split()[1:3]
        with open(f"{proc}/{pid}/comm", "rb") as handle:
            program = handle.read().decode("utf-8", "replace").strip()
        with open(f"{proc}/{pid}/cmdline", "rb") as handle:
            cmdline = handle.read(4096)
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    try:
        exe = os.stat(f"{proc}/{pid}/exe")  # follows the link, even to a deleted (upgraded) file
        exe_id: FileId | None = (exe.st_dev, exe.st_ino)
    except OSError:
        exe_id = None  # a kernel thread, a process that ended, or no right to look
    return Process(pid, ppid, int(uids[0]), int(uids[1]), program, cmdline, exe_id)


def sshd_files(processes: dict[int, Process]) -> set[FileId]:
    """The sshd programs root installed or runs: the installed paths, and the executables of
    root's own sshd processes (the listener, which still runs the old file after an upgrade)."""
    files = {(st.st_dev, st.st_ino) for st in map(_stat, SSHD_PATHS) if st is not None and _root_only(st)}
    for process in processes.values():
        if (process.uid, process.euid) == (0, 0) and process.program in SSHD_PROGRAMS and process.exe:
            files.add(process.exe)
    return files


def ssh_sessions(proc: str = "/proc") -> int:
    """Authenticated SSH sessions on this machine (one process per connection)."""
    processes = {int(pid): p for pid in os.listdir(proc) if pid.isdigit() and (p := read_process(proc, int(pid)))}
    trusted = sshd_files(processes)
    count = 0
    for process in processes.values():
        if is_real_session(process, processes.get(process.ppid), trusted):
            # The parent may have ended and its PID gone to another process since we read it:
            # then this process was adopted and its parent PID changed.
            again = read_process(proc, process.pid)
            count += again is not None and again.ppid == process.ppid
    return count


def _title(cmdline: bytes) -> str:
    return cmdline.split(b"\0", 1)[0].decode("utf-8", "replace").strip()


def _stat(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


def _root_only(st: os.stat_result) -> bool:
    """A file only root can have written (owned by root, not group- or world-writable)."""
    return st.st_uid == 0 and not st.st_mode & 0o022


def containers_with(*labels: str) -> list[str]:
    """Running containers carrying every one of ``labels`` (key=value)."""
    if shutil.which("docker") is None:
        return []
    filters = [arg for label in labels if label for arg in ("--filter", f"label={label}")]
    out = subprocess.run(["docker", "ps", "-q", *filters], capture_output=True, text=True, check=False)
    return out.stdout.split()


def training_labels(cfg: dict[str, Any]) -> tuple[str, ...]:
    # The box label keeps the watcher to this box's containers on an engine others share.
    return (cfg.get("train_label", TRAIN_LABEL), cfg.get("box_label", ""))


def gpu_utilisation() -> list[int]:
    if shutil.which("nvidia-smi") is None:
        return []
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return [int(v) for v in out.stdout.split() if v.strip().isdigit()]


def dev_container_token(label: str) -> str | None:
    """The dev container's Jupyter token: it is started with JUPYTER_TOKEN in its environment."""
    for container in containers_with(label):
        out = subprocess.run(
            ["docker", "inspect", "--format", "{{range .Config.Env}}{{println .}}{{end}}", container],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        for line in out.stdout.splitlines():
            if line.startswith("JUPYTER_TOKEN="):
                return line.split("=", 1)[1]
    return None


def busy_kernels(url: str | None, token: str | None) -> int:
    if not url:
        return 0
    request = urllib.request.Request(f"{url.rstrip('/')}/api/kernels")
    if token:
        request.add_header("Authorization", f"token {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            kernels = json.load(response)
    except (OSError, ValueError):
        return 0  # no Jupyter running: nothing busy
    return sum(1 for kernel in kernels if kernel.get("execution_state") == "busy")


def busy_reasons(cfg: dict[str, Any]) -> list[str]:
    reasons = []
    if (n := ssh_sessions()) > 0:
        reasons.append(f"{n} SSH session(s)")
    if containers := containers_with(*training_labels(cfg)):
        reasons.append(f"{len(containers)} training container(s) running")
    threshold = cfg.get("gpu_util_threshold", 5)
    if any(u >= threshold for u in gpu_utilisation()):
        reasons.append(f"GPU utilisation at or above {threshold}%")
    token = _read(cfg.get("jupyter_token_file")) or dev_container_token(cfg.get("dev_label", DEV_LABEL))
    if (n := busy_kernels(cfg.get("jupyter_url"), token)) > 0:
        reasons.append(f"{n} Jupyter kernel(s) busy")
    return reasons


def stop_training(labels: tuple[str, ...]) -> list[str]:
    containers = containers_with(*labels)
    if containers:
        subprocess.run(["docker", "stop", "--time", str(STOP_TIMEOUT_SECONDS), *containers], check=False)
    return containers


def act(cfg: dict[str, Any]) -> str:
    stopped = stop_training(training_labels(cfg))
    action = cfg.get("action", "none")
    if action == "lambda-terminate":
        key = _read(cfg["lambda_key_file"])
        body = json.dumps({"instance_ids": [cfg["lambda_instance_id"]]}).encode()
        request = urllib.request.Request(
            f"{cfg['lambda_api_url'].rstrip('/')}/instance-operations/terminate", data=body, method="POST",
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()
    elif action == "poweroff":
        subprocess.run(["shutdown", "-h", "now"], check=False)
    return f"stopped {len(stopped)} training container(s); action {action}"


def over_budget(cfg: dict[str, Any], now: float) -> str | None:
    """Spent at least ``budget_usd`` since launch, at the instance's hourly price."""
    budget = cfg.get("budget_usd")
    if not budget or "launched_at" not in cfg:
        return None
    spent = cfg["price_cents_per_hour"] / 100 * (now - cfg["launched_at"]) / 3600
    return f"budget_usd ${budget:.2f} reached (${spent:.2f} spent)" if spent >= budget else None


def check(cfg: dict[str, Any], state: dict[str, Any], now: float) -> dict[str, Any]:
    """One look at the box; returns the new state (and acts when the idle time is up)."""
    budget = over_budget(cfg, now)
    if budget and not state.get("acted"):
        # Training is checkpointed by act() before the box stops, busy or not.
        return {**state, "checked_at": now, "stop_at": now, "busy": [], "acted": f"{budget}: {act(cfg)}"}
    reasons = busy_reasons(cfg)
    idle_seconds = cfg.get("idle_minutes", 30) * 60
    if reasons:
        return {"idle_since": None, "stop_at": None, "busy": reasons, "checked_at": now, "acted": None}
    idle_since = state.get("idle_since") or now
    new = {"idle_since": idle_since, "stop_at": idle_since + idle_seconds, "busy": [], "checked_at": now,
           "acted": state.get("acted")}  # fmt: skip
    if now >= new["stop_at"] and not state.get("acted"):
        new["acted"] = act(cfg)
    return new


def write_state(path: str, state: dict[str, Any]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as handle:
        json.dump(state, handle)
    os.replace(tmp, path)


def _read(path: str | None) -> str | None:
    if not path:
        return None
    try:
        with open(path) as handle:
            return handle.read().strip() or None
    except OSError:
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description="Stop this box when nobody uses it.")
    parser.add_argument("--config", default="/etc/lenslab/autostop.json")
    parser.add_argument("--once", action="store_true", help="look once, print the state, exit")
    args = parser.parse_args()
    with open(args.config) as handle:
        cfg = json.load(handle)
    state_file = cfg.get("state_file", "/var/lib/lenslab/autostop.json")
    os.makedirs(os.path.dirname(state_file), exist_ok=True)
    state: dict[str, Any] = json.loads(_read(state_file) or "{}")
    while True:
        state = check(cfg, state, time.time())
        write_state(state_file, state)
        if args.once or state.get("acted"):
            print(json.dumps(state))
            return 0
        time.sleep(cfg.get("check_every_seconds", CHECK_EVERY_SECONDS))


if __name__ == "__main__":
    sys.exit(main())
