"""The autostop watcher on a real box: an authenticated SSH session or a training container
keeps it up, a connection that never logs in does not; an idle box is stopped (here: its Lambda
instance terminated through the API emulator)."""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lenslab_testkit
import paramiko
import pytest
from lenslab_testkit import IMAGE, LABEL, VM, docker

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.support.lambda_emulator import LambdaEmulator

REPO = Path(__file__).resolve().parents[2]
KEY = "autostop-test-key"


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[LambdaEmulator]:
    emulator = LambdaEmulator(tmp_path / "fs", api_key=KEY).start()
    emulator.launch_interval = 0.0
    emulator.on_launch = lambda instance: "127.0.0.1"
    yield emulator
    emulator.stop()


class Watcher:
    def __init__(self, vm: VM, cloud: LambdaEmulator) -> None:
        import httpx

        self.vm = vm
        self.label = f"lenslab.train={uuid.uuid4().hex[:8]}"
        key = {"name": "k", "public_key": "ssh-ed25519 AAAA k"}
        headers = {"Authorization": f"Bearer {KEY}"}
        httpx.post(f"{cloud.url}/ssh-keys", json=key, headers=headers).raise_for_status()
        launch = {"region_name": "us-east-1", "instance_type_name": "gpu_1x_a100_sxm4", "ssh_key_names": ["k"]}
        self.instance_id = httpx.post(f"{cloud.url}/instance-operations/launch", json=launch, headers=headers).json()[
            "data"
        ]["instance_ids"][0]
        docker("cp", str(REPO / "provision" / "autostop.py"), f"{vm.container}:/usr/local/lib/lenslab-autostop.py")
        config = {
            "idle_minutes": 0.01,
            "check_every_seconds": 0.2,
            "train_label": self.label,
            "action": "lambda-terminate",
            "lambda_api_url": cloud.url,
            "lambda_instance_id": self.instance_id,
            "lambda_key_file": "/etc/lenslab/lambda-api-key",
            "state_file": "/var/lib/lenslab/autostop.json",
        }
        script = (
            f"mkdir -p /etc/lenslab && umask 077 && echo {KEY} > /etc/lenslab/lambda-api-key && "
            f"echo '{json.dumps(config)}' > /etc/lenslab/autostop.json"
        )
        assert vm.exec(script).returncode == 0

    def run(self, *args: str) -> dict[str, Any]:
        out = self.vm.exec(f"timeout 60 python3 /usr/local/lib/lenslab-autostop.py {' '.join(args)}")
        assert out.returncode == 0, out.stderr
        state: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
        return state


@pytest.fixture
def vm(vm_factory: type[VM], monkeypatch: pytest.MonkeyPatch) -> VM:
    """A fresh VM whose root may, like a real box's root, read /proc/PID/exe of sshd's processes
    (they are not dumpable, so that takes CAP_SYS_PTRACE, which Docker leaves out by default)."""

    def docker_with_ptrace(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        if args[:1] == ("run",):
            args = ("run", "--cap-add", "SYS_PTRACE", *args[1:])
        result: subprocess.CompletedProcess[str] = docker(*args, check=check)
        return result

    with monkeypatch.context() as patch:
        patch.setattr(lenslab_testkit, "docker", docker_with_ptrace)
        return vm_factory().start()


@pytest.fixture
def watcher(vm: VM, cloud: LambdaEmulator) -> Watcher:
    return Watcher(vm, cloud)


def _load_watcher() -> Any:
    spec = importlib.util.spec_from_file_location("autostop_script", REPO / "provision" / "autostop.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _session(vm: VM, keypair: Path) -> paramiko.SSHClient:
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    kind, blob = vm.exec("cat /etc/ssh/ssh_host_ed25519_key.pub").stdout.split()[:2]
    client.get_host_keys().add(f"[127.0.0.1]:{vm.port}", kind, paramiko.Ed25519Key(data=base64.b64decode(blob)))
    client.connect("127.0.0.1", port=vm.port, username="debian", key_filename=str(keypair))
    return client


def test_open_ssh_session_keeps_the_box_up(watcher: Watcher, keypair: Path, cloud: LambdaEmulator) -> None:
    client = _session(watcher.vm, keypair)
    try:
        state = watcher.run("--once")
    finally:
        client.close()
    assert state["busy"] == ["1 SSH session(s)"]
    assert state["stop_at"] is None
    assert watcher.instance_id in cloud.instances


def test_connections_that_never_log_in_do_not_keep_the_box_up(watcher: Watcher, keypair: Path) -> None:
    """What an internet scanner does to port 22: hold a socket open, read the banner, run the
    key exchange, try a key that is refused. None of it is a session."""
    port = watcher.vm.port
    silent = socket.create_connection(("127.0.0.1", port))
    banner = socket.create_connection(("127.0.0.1", port))
    assert banner.recv(64).startswith(b"SSH-2.0-")
    banner.sendall(b"SSH-2.0-scanner\r\n")
    kex = paramiko.Transport(socket.create_connection(("127.0.0.1", port)))
    kex.start_client(timeout=30)
    refused = paramiko.Transport(socket.create_connection(("127.0.0.1", port)))
    refused.start_client(timeout=30)
    with pytest.raises(paramiko.AuthenticationException):
        refused.auth_publickey("debian", paramiko.RSAKey.generate(2048))  # a key the box does not know
    try:
        # Each of the four holds an sshd process on the box while the watcher looks.
        processes = watcher.vm.exec("pgrep -c -x sshd").stdout.strip()
        assert int(processes) >= 5, processes
        idle = watcher.run("--once")
        assert idle["busy"] == [], idle
        client = _session(watcher.vm, keypair)
        try:
            busy = watcher.run("--once")
        finally:
            client.close()
        assert busy["busy"] == ["1 SSH session(s)"]
    finally:
        for held in (silent, banner):
            held.close()
        kex.close()
        refused.close()


# Process titles as OpenSSH sets them (seen on Debian bookworm's 9.2p1; 9.8 and later run the
# session as sshd-session): cmdline is the title, NUL-padded. "sshd: USER" is a logged-in
# connection with no session channel (port forwarding only).
SESSION_TITLES = [b"sshd: debian@pts/0\0\0\0", b"sshd: debian@notty", b"sshd-session: root@pts/12\0",
                  b"sshd: deploy.bot@notty   ", b"sshd: debian\0\0", b"sshd-session: debian"]  # fmt: skip
NOT_SESSIONS = [b"sshd: [accepted]", b"sshd: [net]", b"sshd: debian [priv]", b"sshd: debian [net]",
                b"sshd: unknown [net]", b"sshd: 203.0.113.9 [preauth]", b"sshd-session: debian [priv]",
                b"sshd: debian@notty [net]", b"sshd: /usr/sbin/sshd -D [listener] 0 of 10-100 startups",
                b"sshd: debian@pts/0x", b"/usr/sbin/sshd", b"sshd: debian extra", b""]  # fmt: skip


def test_session_titles() -> None:
    script = _load_watcher()
    for title in SESSION_TITLES:
        assert script.is_session("sshd", title) and script.is_session("sshd-session", title), title
        assert not script.is_session("bash", title), title
    for title in NOT_SESSIONS:
        assert not script.is_session("sshd", title) and not script.is_session("sshd-session", title), title


# Spoofs an unprivileged user can start: a copy of sleep named sshd, titled like a session, once
# adopted by PID 1 (the box's sshd listener here, so its parent is a root-owned sshd) and once a
# child of the user's own shell.
SPOOF_BINARY = "mkdir -p /tmp/spoof && cp /bin/sleep /tmp/spoof/sshd && chmod -R 755 /tmp/spoof"
AS_NOBODY = "setsid setpriv --reuid=65534 --regid=65534 --clear-groups bash -c "
# Two impostors run as nobody: one adopted by the sshd listener (PID 1), one under its own bash.
SPOOFS = {
    "sshd: nobody@notty 120": AS_NOBODY + "'(exec -a \"sshd: nobody@notty\" /tmp/spoof/sshd 120 &)'",
    "sshd: nobody@pts/0 120": AS_NOBODY + "'exec -a \"sshd: nobody@pts/0\" /tmp/spoof/sshd 120 & wait'",
}
SPOOF_START_SECONDS = 60.0  # generous: a loaded machine can take seconds per `docker exec`


def _start_spoofs(vm: VM) -> set[tuple[str, str]]:
    """Start both impostors (detached, each retried until it shows); their (ppid, title)s."""
    assert vm.exec(SPOOF_BINARY).returncode == 0
    deadline = time.monotonic() + SPOOF_START_SECONDS
    started: dict[str, float] = {}
    posing: set[tuple[str, str]] = set()
    while time.monotonic() < deadline:
        listing = vm.exec("ps -u nobody -o ppid=,args=").stdout.splitlines()
        posing = {(ppid, title) for ppid, title in (line.split(None, 1) for line in listing) if "@" in title}
        missing = [title for title in SPOOFS if title not in {t for _, t in posing}]
        if not missing:
            return posing
        for title in missing:
            if time.monotonic() - started.get(title, -1e9) > 5:
                docker("exec", "-d", vm.container, "bash", "-c", SPOOFS[title], check=True)
                started[title] = time.monotonic()
        time.sleep(0.2)
    return posing


def test_processes_posing_as_sessions_do_not_keep_the_box_up(watcher: Watcher, keypair: Path) -> None:
    vm = watcher.vm
    posing = _start_spoofs(vm)
    assert ("1", "sshd: nobody@notty 120") in posing, posing  # adopted by the sshd listener (PID 1)
    assert any(title == "sshd: nobody@pts/0 120" and ppid != "1" for ppid, title in posing), posing
    idle = watcher.run("--once")
    assert idle["busy"] == [], idle
    client = _session(vm, keypair)
    try:
        busy = watcher.run("--once")
    finally:
        client.close()
    assert busy["busy"] == ["1 SSH session(s)"], busy


SSHD = (8, 100)  # (st_dev, st_ino) of the installed sshd


def _process(pid: int, ppid: int, uid: int, title: bytes, exe: tuple[int, int] | None = SSHD) -> Any:
    return _load_watcher().Process(pid, ppid, uid, uid, "sshd", title, exe)


def test_only_sshds_own_session_processes_count() -> None:
    script = _load_watcher()
    listener = _process(1, 0, 0, b"sshd: /usr/sbin/sshd -D [listener] 0 of 10-100 startups")
    monitor = _process(20, 1, 0, b"sshd: debian [priv]")
    session = _process(21, 20, 1000, b"sshd: debian@notty")
    trusted = {SSHD}
    assert script.is_real_session(session, monitor, trusted)
    # A root login: the monitor itself takes the session title; its parent is the listener.
    assert script.is_real_session(_process(30, 1, 0, b"sshd: root@pts/0"), listener, trusted)
    refused = [
        (session._replace(exe=(8, 101)), monitor),  # a copy of some program named sshd
        (session._replace(exe=None), monitor),  # its executable could not be read
        (session._replace(cmdline=b"sshd: debian [net]"), monitor),  # not authenticated
        (session, None),  # the parent ended
        (session, monitor._replace(pid=22)),  # another process than its parent
        (session, monitor._replace(uid=1000, euid=1000)),  # a parent the user owns
        (session, monitor._replace(euid=1000)),
        (session, monitor._replace(exe=(8, 101))),  # a root parent that is not sshd
        (session._replace(ppid=1), listener),  # a user's orphan, adopted by an sshd that is PID 1
    ]
    for process, parent in refused:
        assert not script.is_real_session(process, parent, trusted), (process, parent)


def test_reading_processes() -> None:
    script = _load_watcher()
    me = script.read_process("/proc", os.getpid())
    executable = os.stat(f"/proc/{os.getpid()}/exe")
    assert (me.ppid, me.uid, me.exe) == (os.getppid(), os.getuid(), (executable.st_dev, executable.st_ino))
    ended = subprocess.Popen(["true"])
    ended.wait()
    assert script.read_process("/proc", ended.pid) is None  # reaped: gone while we looked


def test_watcher_constants_match_the_contract() -> None:
    """The watcher runs alone on the box and cannot import lenslab.contract: its copies must agree."""
    from lenslab import contract

    script = _load_watcher()
    assert script.STOP_TIMEOUT_SECONDS == contract.STOP_TIMEOUT_SECONDS
    assert f"{contract.ROLE_LABEL}=train" == script.TRAIN_LABEL
    assert f"{contract.ROLE_LABEL}=dev" == script.DEV_LABEL


def test_running_training_container_keeps_the_box_up(watcher: Watcher, cloud: LambdaEmulator) -> None:
    name = f"train-{uuid.uuid4().hex[:8]}"
    key, value = watcher.label.split("=")
    docker("run", "-d", "--name", name, "--label", LABEL, "--label", f"{key}={value}", "--network", "none",
           IMAGE, "sleep", "120")  # fmt: skip
    try:
        state = watcher.run("--once")
    finally:
        docker("rm", "-f", name, check=False)
    assert state["busy"] == ["1 training container(s) running"]
    assert watcher.instance_id in cloud.instances


def test_another_boxs_training_container_neither_keeps_the_box_up_nor_is_stopped(
    watcher: Watcher, cloud: LambdaEmulator
) -> None:
    """Boxes may share an engine (as these tests do): each watcher looks at its own box's containers."""
    name = f"train-{uuid.uuid4().hex[:8]}"
    docker("run", "-d", "--name", name, "--label", LABEL, "--label", watcher.label, "--label", "lenslab.box=other",
           "--network", "none", IMAGE, "sleep", "120")  # fmt: skip
    settings = json.loads(watcher.vm.exec("cat /etc/lenslab/autostop.json").stdout)
    settings.update(box_label="lenslab.box=mine", idle_minutes=0.001)
    watcher.vm.exec(f"echo '{json.dumps(settings)}' > /etc/lenslab/autostop.json")
    try:
        state = watcher.run()  # loops until it acts
        assert state["acted"] == "stopped 0 training container(s); action lambda-terminate"
        assert docker("inspect", "-f", "{{.State.Running}}", name).stdout.strip() == "true"
    finally:
        docker("rm", "-f", name, check=False)


def test_idle_box_is_stopped_after_the_idle_time(watcher: Watcher, cloud: LambdaEmulator) -> None:
    first = watcher.run("--once")
    assert first["busy"] == [] and first["stop_at"] - first["idle_since"] == pytest.approx(0.6)
    state = watcher.run()  # loops until it acts
    assert state["acted"] == "stopped 0 training container(s); action lambda-terminate"
    assert cloud.instances == {}
    saved = json.loads(watcher.vm.exec("cat /var/lib/lenslab/autostop.json").stdout)
    assert saved["acted"] == state["acted"]


def test_autostop_is_valid_python_without_third_party_modules() -> None:
    out = subprocess.run([sys.executable, "-I", "-S", str(REPO / "provision" / "autostop.py"), "--help"],
                         capture_output=True, text=True, check=False)  # fmt: skip
    assert out.returncode == 0 and "Stop this box when nobody uses it." in out.stdout


def test_budget_reached_stops_a_busy_box_after_checkpointing(watcher: Watcher, cloud: LambdaEmulator) -> None:
    # A "training" container that, like lenslab-train, saves on SIGTERM before it exits.
    name = f"train-{uuid.uuid4().hex[:8]}"
    key, value = watcher.label.split("=")
    marker = f"/tmp/{name}-checkpointed"
    script = f"trap 'touch {marker}; exit 75' TERM; while true; do sleep 0.1; done"
    docker("run", "-d", "--name", name, "--label", LABEL, "--label", f"{key}={value}", "--network", "none",
           "-v", "/tmp:/tmp", IMAGE, "bash", "-c", script)  # fmt: skip
    settings = json.loads(watcher.vm.exec("cat /etc/lenslab/autostop.json").stdout)
    settings.update(budget_usd=1.0, price_cents_per_hour=129, launched_at=time.time() - 3600)
    watcher.vm.exec(f"echo '{json.dumps(settings)}' > /etc/lenslab/autostop.json")
    try:
        state = watcher.run("--once")
        assert state["acted"] == (
            "budget_usd $1.00 reached ($1.29 spent): stopped 1 training container(s); action lambda-terminate"
        )
        assert Path(marker).exists(), "the training container was not stopped gracefully"
        assert cloud.instances == {}
    finally:
        docker("rm", "-f", name, check=False)
        Path(marker).unlink(missing_ok=True)
