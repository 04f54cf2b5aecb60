#!/usr/bin/env python3
"""lenslab autostop: stop a box that nobody uses, so a forgotten box does not burn money.

Runs on the box (standard library only): as root on a VM, as the box user inside a container box
(a RunPod pod, a vast.ai instance: no root, no systemd, no Docker engine). The box counts as idle
only when all hold:
- no authenticated SSH session (VSCode's Remote-SSH included): counted from sshd's per-session
  processes, so a connection that never logs in (an internet scanner) keeps nothing up. A process's
  name and title are its owner's to choose, so a session counts only when the installed sshd
  program runs it and an sshd of the watcher's own user is its parent (see is_real_session). On a
  VM that user is root: no unprivileged user can keep the box up by posing as a session; reading
  other users' /proc/PID/exe takes root's CAP_SYS_PTRACE, and without it no session counts. In a
  container sshd runs as the box user, like the watcher: reading its own processes' executables
  needs no capability, and no other user is there to pose;
- no running lenslab training: containers of this box (labels ``lenslab.role=train`` and, when
  configured, ``lenslab.box=<name>``), or runs supervised by ``lenslab-box`` (``box_command``);
- every GPU's utilisation is under the threshold;
- no Jupyter kernel is busy.
After ``idle_minutes`` of that, it stops lenslab's training gracefully (SIGTERM: it writes a
checkpoint) and then takes the configured action: ``lambda-terminate``, ``runpod-stop``,
``runpod-terminate``, ``vast-stop`` or ``vast-destroy`` (through the provider's API with the key
in ``key_file``, for the instance the ``instance_id_env`` variable names, else ``instance_id``;
Lambda's settings are ``lambda_*``), ``poweroff``, or ``none``. With ``budget_usd`` set, spending
what is left of it (``budget_usd - spent_before_usd``, at ``price_per_hour_usd`` since
``launched_at``) does the same at once, busy or not. A failed API call is tried again later.

State, for ``lenslab status`` (time left before autostop): the JSON file ``state_file``.

    autostop.py --config /etc/lenslab/autostop.json [--once | --wait]

``--wait`` (a container box's ``lenslab-box serve`` starts it so): the settings may arrive later
and change; they are read again at every check, and the watcher keeps running after it acted.
Until the file is there, the settings the instance was created with (``$LENSLAB_AUTOSTOP``, its
key in ``$<key_env>``) apply, so an instance whose laptop went away right after launch stops.
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
import urllib.parse
import urllib.request
from typing import Any, NamedTuple

CHECK_EVERY_SECONDS = 60.0
WAIT_SECONDS = 5.0  # how often --wait looks for settings that are not there yet
# The settings a container instance was created with (lenslab.remote.autostop.ENV_SETTINGS).
ENV_SETTINGS = "LENSLAB_AUTOSTOP"
STATE_FILE = "/var/lib/lenslab/autostop.json"
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


def is_real_session(process: Process, parent: Process | None, sshd_files: set[FileId], owner: int = 0) -> bool:
    """An authenticated SSH session that no other user can fake: the session title, the
    installed sshd program running it, and a parent sshd owned by ``owner`` (the user sshd runs
    as: root on a VM, the box user in a container). A user can neither create another user's
    process nor pick their process's parent; an orphan is adopted by PID 1 (in a container maybe
    sshd itself, or ``lenslab-box serve``), so a session's parent must be the ``[priv]`` monitor
    (a root process's title is root's to write)."""
    if not is_session(process.program, process.cmdline) or process.exe not in sshd_files:
        return False
    if parent is None or parent.pid != process.ppid or (parent.uid, parent.euid) != (owner, owner):
        return False
    if parent.exe not in sshd_files:
        return False
    if owner == 0 and process.uid == 0:
        return True  # a root-owned session process is root's own doing, whatever sshd forked it
    if owner != 0 and process.uid != owner:
        return False  # an unprivileged sshd cannot start another user's session
    return MONITOR_TITLE.fullmatch(_title(parent.cmdline)) is not None


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


def ssh_sessions(proc: str = "/proc", owner: int | None = None) -> int:
    """Authenticated SSH sessions on this machine (one process per connection), served by the
    sshd of ``owner`` (default: the watcher's own user, root on a VM, the box user in a container)."""
    owner = os.geteuid() if owner is None else owner
    processes = {int(pid): p for pid in os.listdir(proc) if pid.isdigit() and (p := read_process(proc, int(pid)))}
    trusted = sshd_files(processes)
    count = 0
    for process in processes.values():
        if is_real_session(process, processes.get(process.ppid), trusted, owner):
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


def box_runs(cfg: dict[str, Any]) -> list[str] | None:
    """The live runs ``lenslab-box`` supervises (a box without Docker), or None when it did not
    answer. ``box_command`` is how to call it, e.g. ["lenslab-box", "--root", "/lab"]."""
    command = cfg.get("box_command")
    if not command:
        return []
    try:
        out = subprocess.run([*command, "runs"], capture_output=True, text=True, check=True, timeout=60)
        runs = json.loads(out.stdout)
    except (OSError, ValueError, subprocess.SubprocessError):
        return None
    if not isinstance(runs, list):
        return None
    live = [r for r in runs if isinstance(r, dict) and isinstance(r.get("supervisor"), dict)]
    return [str(r.get("name")) for r in live if r["supervisor"].get("alive") is True]


def busy_reasons(cfg: dict[str, Any]) -> list[str]:
    reasons = []
    if (n := ssh_sessions()) > 0:
        reasons.append(f"{n} SSH session(s)")
    if containers := containers_with(*training_labels(cfg)):
        reasons.append(f"{len(containers)} training container(s) running")
    runs = box_runs(cfg)
    if runs is None:
        # Rather up than a run killed unseen: budget_usd still bounds what it costs.
        reasons.append("lenslab-box did not list its runs")
    elif runs:
        reasons.append(f"{len(runs)} supervised run(s) running")
    threshold = cfg.get("gpu_util_threshold", 5)
    if any(u >= threshold for u in gpu_utilisation()):
        reasons.append(f"GPU utilisation at or above {threshold}%")
    token = _read(cfg.get("jupyter_token_file")) or dev_container_token(cfg.get("dev_label", DEV_LABEL))
    if (n := busy_kernels(cfg.get("jupyter_url"), token)) > 0:
        reasons.append(f"{n} Jupyter kernel(s) busy")
    return reasons


def stop_training(cfg: dict[str, Any]) -> str:
    """Stop this box's training gracefully (each run checkpoints); what was stopped, in words."""
    containers = containers_with(*training_labels(cfg))
    if containers:
        subprocess.run(["docker", "stop", "--time", str(STOP_TIMEOUT_SECONDS), *containers], check=False)
    done = f"stopped {len(containers)} training container(s)"
    if not cfg.get("box_command"):
        return done
    runs = box_runs(cfg) or []
    for name in runs:
        # `lenslab-box stop` waits for the checkpoint; the run stays stopped, as a stopped container does.
        subprocess.run([*cfg["box_command"], "stop", name], capture_output=True, check=False,
                       timeout=STOP_TIMEOUT_SECONDS + 60)  # fmt: skip
    return f"{done} and {len(runs)} supervised run(s)"


class ActionFailed(Exception):
    """The provider's API did not do what was asked (the watcher tries again at its next check)."""


# RunPod's GraphQL pod mutations, as its official client sends them (runpod/api/mutations/pods.py).
RUNPOD_MUTATIONS = {
    "runpod-stop": "mutation Stop($input: PodStopInput!) { podStop(input: $input) { id desiredStatus } }",
    "runpod-terminate": "mutation Terminate($input: PodTerminateInput!) { podTerminate(input: $input) }",
}
VAST_ACTIONS = {"vast-stop": ("PUT", {"state": "stopped"}), "vast-destroy": ("DELETE", {})}


def own_instance_id(cfg: dict[str, Any]) -> str:
    """This instance's id: from the variable its provider sets in it, else from the settings."""
    return os.environ.get(cfg.get("instance_id_env") or "") or str(cfg.get("instance_id") or "")


def api_request(cfg: dict[str, Any], action: str) -> urllib.request.Request | None:
    """The provider API call that stops or terminates this instance, or None for other actions."""
    body: dict[str, Any]
    if action == "lambda-terminate":
        method, url = "POST", f"{cfg['lambda_api_url'].rstrip('/')}/instance-operations/terminate"
        body, key_file = {"instance_ids": [cfg["lambda_instance_id"]]}, cfg["lambda_key_file"]
    elif action in RUNPOD_MUTATIONS or action in VAST_ACTIONS:
        instance = own_instance_id(cfg)
        if not instance:
            raise ActionFailed(f"no instance id (${cfg.get('instance_id_env')} is not set)")
        if action in RUNPOD_MUTATIONS:
            method, url = "POST", cfg["api_url"]
            body = {"query": RUNPOD_MUTATIONS[action], "variables": {"input": {"podId": instance}}}
        else:
            method, body = VAST_ACTIONS[action]
            url = f"{cfg['api_url'].rstrip('/')}/instances/{urllib.parse.quote(instance, safe='')}/"
        key_file = cfg.get("key_file")
    else:
        return None
    # Create-time settings carry no key file: the key is in the provider's variable (key_env).
    key = _read(key_file) if key_file else os.environ.get(cfg.get("key_env") or "", "").strip()
    if not key:
        raise ActionFailed(f"no API key in {key_file or '$' + str(cfg.get('key_env'))}")
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    return urllib.request.Request(url, data=json.dumps(body).encode(), method=method, headers=headers)


def call_api(request: urllib.request.Request) -> None:
    """Send it; a refusal (an HTTP error, GraphQL ``errors``, vast.ai's ``success: false``) raises."""
    with urllib.request.urlopen(request, timeout=30) as response:
        raw = response.read()
    try:
        reply = json.loads(raw) if raw.strip() else {}
    except ValueError:
        return  # an answer without a body to check (Lambda's is JSON, but HTTP 200 is what counts)
    if isinstance(reply, dict) and reply.get("errors"):
        messages = [e.get("message") for e in reply["errors"] if isinstance(e, dict)]
        raise ActionFailed("; ".join(str(m) for m in messages) or "the API answered with errors")
    if isinstance(reply, dict) and reply.get("success") is False:
        raise ActionFailed(str(reply.get("msg") or reply.get("error") or "the API answered success: false"))


def act(cfg: dict[str, Any]) -> str:
    stopped = stop_training(cfg)
    action = cfg.get("action", "none")
    request = api_request(cfg, action)
    if request is not None:
        call_api(request)
    elif action == "poweroff":
        subprocess.run(["shutdown", "-h", "now"], check=False)
    return f"{stopped}; action {action}"


def _same_instance(cfg: dict[str, Any]) -> bool:
    """False for settings written for an earlier instance on this persistent volume: their
    launch time and price are not this instance's."""
    given, own = str(cfg.get("instance_id") or ""), os.environ.get(cfg.get("instance_id_env") or "")
    return not (given and own and given != own)


def over_budget(cfg: dict[str, Any], now: float) -> str | None:
    """What is left of ``budget_usd`` after the box's earlier instances is spent since launch,
    at the instance's hourly price."""
    budget = cfg.get("budget_usd")
    if not budget or "launched_at" not in cfg or not _same_instance(cfg):
        return None
    price = cfg["price_per_hour_usd"] if "price_per_hour_usd" in cfg else cfg["price_cents_per_hour"] / 100
    spent = price * (now - cfg["launched_at"]) / 3600
    before = cfg.get("spent_before_usd") or 0.0
    return f"budget_usd ${budget:.2f} reached (${before + spent:.2f} spent)" if before + spent >= budget else None


def _acting(cfg: dict[str, Any], state: dict[str, Any], why: str | None) -> dict[str, Any]:
    """``state`` after acting, or with the error when the action failed (tried again next time)."""
    try:
        done = act(cfg)
    except (OSError, ValueError, KeyError, ActionFailed) as exc:
        return {**state, "acted": None, "error": f"{cfg.get('action')} failed: {exc}"}
    return {**state, "acted": f"{why}: {done}" if why else done, "error": None}


def check(cfg: dict[str, Any], state: dict[str, Any], now: float) -> dict[str, Any]:
    """One look at the box; returns the new state (and acts when the idle time is up)."""
    budget = over_budget(cfg, now)
    if budget and not state.get("acted"):
        # Training is checkpointed by act() before the box stops, busy or not.
        return _acting(cfg, {**state, "checked_at": now, "stop_at": now, "busy": []}, budget)
    reasons = busy_reasons(cfg)
    idle_seconds = cfg.get("idle_minutes", 30) * 60
    if reasons:
        return {"idle_since": None, "stop_at": None, "busy": reasons, "checked_at": now, "acted": None}
    idle_since = state.get("idle_since") or now
    new = {"idle_since": idle_since, "stop_at": idle_since + idle_seconds, "busy": [], "checked_at": now,
           "acted": state.get("acted"), "error": state.get("error")}  # fmt: skip
    if now >= new["stop_at"] and not state.get("acted"):
        return _acting(cfg, new, None)
    return new


def write_state(path: str, state: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
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


def load_settings(path: str) -> dict[str, Any] | None:
    """The settings, or None while there are none (yet): the laptop writes them atomically."""
    try:
        cfg = json.loads(_read(path) or "null")
    except ValueError:
        return None
    return cfg if isinstance(cfg, dict) else None


def waited_settings(path: str) -> dict[str, Any] | None:
    """--wait: the settings file, else the settings the instance was created with (ENV_SETTINGS);
    a file that says "off" turns both off."""
    cfg = load_settings(path)
    if cfg is None:
        try:
            cfg = json.loads(os.environ.get(ENV_SETTINGS) or "null")
        except ValueError:
            return None
    return cfg if isinstance(cfg, dict) and not cfg.get("off") else None


def main() -> int:
    parser = argparse.ArgumentParser(description="Stop this box when nobody uses it.")
    parser.add_argument("--config", default="/etc/lenslab/autostop.json")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--once", action="store_true", help="look once, print the state, exit")
    mode.add_argument("--wait", action="store_true", help="wait for the settings, read them at every check")
    args = parser.parse_args()
    cfg = load_settings(args.config)
    if cfg is None and not args.wait:
        print(f"autostop: no settings in {args.config}", file=sys.stderr)
        return 2
    # A container box's watcher starts with its instance: nothing of an earlier one applies.
    state: dict[str, Any] = {}
    if cfg is not None and not args.wait:
        state = json.loads(_read(cfg.get("state_file", STATE_FILE)) or "{}")
    while True:
        cfg = waited_settings(args.config) if args.wait else cfg
        if cfg is not None and not (args.wait and state.get("acted")):
            state = check(cfg, state, time.time())
            write_state(cfg.get("state_file", STATE_FILE), state)
            if args.once or (state.get("acted") and not args.wait):
                print(json.dumps(state))
                return 0
        time.sleep(cfg.get("check_every_seconds", CHECK_EVERY_SECONDS) if cfg else WAIT_SECONDS)


if __name__ == "__main__":
    sys.exit(main())
