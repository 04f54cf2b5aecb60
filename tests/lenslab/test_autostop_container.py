"""The autostop watcher inside a container box (a RunPod pod, a vast.ai instance): no root, no
systemd, no Docker engine. The box is a real container of the test VM image running the real
`lenslab-box serve` as an unprivileged user (sshd on the contract's port, the watcher its child),
against the stateful API emulators on 127.0.0.1 (so it runs on the host's network). The laptop
side is the real one: the provider's autostop inputs from its ledger, written onto the box's
volume by `install_in_container`. Idle or over budget, the box stops or terminates its own
instance through the API, as the emulator shows; an open SSH session keeps it up, a process
posing as one does not.
"""

from __future__ import annotations

import base64
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko
import pytest
from lenslab_testkit import IMAGE, LABEL, docker, free_port

from lenslab.config import BoxConfig, Config
from lenslab.providers import container_ledger
from lenslab.providers.container_cloud import ContainerCloud
from lenslab.providers.runpod.api import RunPodClient
from lenslab.providers.runpod.provider import RunPodApi, RunPodProvider
from lenslab.providers.vast.api import VastClient
from lenslab.providers.vast.provider import VastApi, VastProvider
from lenslab.records import Box, RunResult
from lenslab.remote import autostop, labs
from lenslab.remote.bootstrap import LocalRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.support.instance_runner import wait_for_sshd
from tests.support.runpod_emulator import RunPodEmulator
from tests.support.vast_emulator import VastEmulator

REPO = Path(__file__).resolve().parents[2]
ACT_SECONDS = 60.0  # a loaded machine can take seconds per check
# The box CLI as its console script runs it (the test VM image has lenslab's sources mounted).
BOX_CLI = '#!/bin/sh\nexec python3 -m lenslab_workspace.box "$@"\n'


def _load_watcher() -> Any:
    spec = importlib.util.spec_from_file_location("autostop_script", REPO / "provision" / "autostop.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class ExecRunner:
    """The laptop's runner on the box as its user, through `docker exec`: the same commands and
    stdin that lenslab sends over SSH (an SSH session would keep the box busy)."""

    def __init__(self, container: str) -> None:
        self.container = container

    def run(self, command: str, *, stdin: bytes | None = None, on_output: Any = None, check: bool = False) -> RunResult:
        out = subprocess.run(["docker", "exec", "-i", "--user", "debian", self.container, "bash", "-c", command],
                             input=stdin or b"", capture_output=True, check=False, timeout=60)  # fmt: skip
        result = RunResult(out.returncode, out.stdout.decode(), out.stderr.decode())
        assert not check or out.returncode == 0, result
        return result

    def put(self, source: Any, remote_path: str, mode: int = 0o644) -> None:
        raise AssertionError("the watcher's settings are written with run(), the key never with put()")

    def get(self, remote_path: str, dest: Any) -> int:
        raise AssertionError("not used")

    def close(self) -> None:
        pass


@dataclass
class Cloud:
    """One provider's emulator and the provider talking to it, as the CLI builds it."""

    name: str
    emulator: RunPodEmulator | VastEmulator
    provider: ContainerCloud
    port: int  # the box's sshd, on 127.0.0.1

    def state(self, instance_id: str) -> str | None:
        """ "running", "stopped", or None when the instance is gone."""
        if isinstance(self.emulator, RunPodEmulator):
            pod = self.emulator.pods.get(instance_id)
            return None if pod is None else {"RUNNING": "running", "EXITED": "stopped"}[pod["desiredStatus"]]
        row = self.emulator.instances.get(int(instance_id))
        return None if row is None else str(row["intended_status"])


@pytest.fixture(params=["runpod", "vast"])
def cloud(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cloud]:
    port = free_port()
    emulator: RunPodEmulator | VastEmulator
    provider: ContainerCloud
    if request.param == "runpod":
        emulator = RunPodEmulator(tmp_path / "volumes").start()
        monkeypatch.setenv("RUNPOD_API_KEY", emulator.api_key)
        monkeypatch.setenv("RUNPOD_API_URL", emulator.graphql_url)
        client = RunPodClient(emulator.api_key, emulator.graphql_url, emulator.rest_url)
        provider = RunPodProvider(RunPodApi(client), confirm=lambda _: True)
    else:
        emulator = VastEmulator().start()
        monkeypatch.setenv("VAST_API_KEY", emulator.api_key)
        monkeypatch.setenv("VAST_API_URL", emulator.url)
        provider = VastProvider(VastApi(VastClient(emulator.api_key, emulator.url)), confirm=lambda _: True)
    emulator.on_launch = lambda instance: ("127.0.0.1", port)
    yield Cloud(request.param, emulator, provider, port)
    emulator.stop()


@dataclass
class ContainerBox:
    cloud: Cloud
    cfg: BoxConfig
    box: Box
    instance_id: str
    volume: Path
    container: str = ""

    def start(self, tmp_path: Path, public_key: str) -> ContainerBox:
        """The instance's container as the provider runs it: `lenslab-box serve` as the image's
        unprivileged user, the volume at /lab, and the instance's id in the variable the
        provider sets (RUNPOD_POD_ID, CONTAINER_ID)."""
        cli = tmp_path / "bin" / "lenslab-box"
        cli.parent.mkdir(exist_ok=True)
        cli.write_text(BOX_CLI)
        cli.chmod(0o755)
        self.volume.mkdir(parents=True, exist_ok=True)
        self.volume.chmod(0o777)  # the box user (UID 1000) owns nothing on the host
        self.container = docker(
            "run", "-d", "--label", LABEL, "--network", "host", "--user", "debian",
            "-v", f"{self.volume}:/lab", "-v", f"{cli}:/usr/local/bin/lenslab-box:ro",
            "-v", f"{REPO / 'src'}:/s/src:ro", "-v", f"{REPO / 'workspace'}:/s/ws:ro",
            "-v", f"{REPO / 'provision'}:/s/provision:ro", "-e", "PYTHONPATH=/s/src:/s/ws",
            "-e", "LENSLAB_ROOT=/lab", "-e", f"LENSLAB_SSH_PORT={self.cloud.port}",
            "-e", f"LENSLAB_PUBLIC_KEY={public_key}", "-e", f"{self.cloud.provider.instance_id_env}={self.instance_id}",
            IMAGE, "python3", "-m", "lenslab_workspace.box", "serve",
        ).stdout.strip()  # fmt: skip
        wait_for_sshd(self.container, self.cloud.port, timeout=ACT_SECONDS)
        return self

    def install(self, **changes: Any) -> dict[str, Any]:
        """What `lenslab up` does on a container box (lenslab.remote.labs); with ``changes``, its
        steps with the settings changed. The settings as the box holds them."""
        if not changes:
            labs._install_autostop(
                self.cloud.provider, Config(box=self.cfg), self.box, ExecRunner(self.container), "/lab"
            )
            written: dict[str, Any] = json.loads((self.volume / ".lenslab" / "autostop.json").read_text())
            return written
        provider = self.cloud.provider
        inputs = provider.autostop_inputs(self.cfg)
        settings = autostop.watcher_config(self.cfg, self.box, provider.capabilities.autostop, inputs.settings)
        assert settings is not None
        settings.update(changes)
        autostop.install_in_container(ExecRunner(self.container), "/lab", settings, inputs.api_key, inputs.key_name)
        return settings

    def state(self) -> dict[str, Any]:
        try:
            state: dict[str, Any] = json.loads((self.volume / ".lenslab" / "autostop-state.json").read_text())
        except (OSError, ValueError):
            return {}
        return state

    def wait_for(self, wanted: str | None) -> None:
        deadline = time.monotonic() + ACT_SECONDS
        while self.cloud.state(self.instance_id) != wanted:
            assert time.monotonic() < deadline, (self.cloud.state(self.instance_id), self.state(), self.log())
            time.sleep(0.2)

    def log(self) -> str:
        out = docker("logs", self.container, check=False)
        watcher = (self.volume / ".lenslab" / "autostop.log").read_text(errors="replace")
        text: str = (out.stdout + out.stderr)[-1500:] + watcher[-1500:]
        return text

    def session(self, keypair: Path) -> paramiko.SSHClient:
        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        kind, blob = (self.volume / ".lenslab" / "ssh" / "ssh_host_ed25519_key.pub").read_text().split()[:2]
        client.get_host_keys().add(
            f"[127.0.0.1]:{self.cloud.port}", kind, paramiko.Ed25519Key(data=base64.b64decode(blob))
        )
        client.connect("127.0.0.1", port=self.cloud.port, username="debian", key_filename=str(keypair),
                       look_for_keys=False, allow_agent=False)  # fmt: skip
        return client


@pytest.fixture
def make_box(cloud: Cloud, tmp_path: Path, keypair: Path, docker_ready: None) -> Iterator[Any]:
    boxes: list[ContainerBox] = []

    def make(**fields: Any) -> ContainerBox:
        extra: dict[str, Any] = {"mirror": "s3://bucket/lenslab"} if cloud.name == "vast" else {}
        cfg = BoxConfig(name=f"a{uuid.uuid4().hex[:6]}", provider=cloud.name, identity_file=str(keypair),
                        **extra, **fields)  # fmt: skip
        box = cloud.provider.launch(cfg)
        instance_id = container_ledger.read(cloud.name, cfg.name).instance_id
        made = ContainerBox(cloud, cfg, box, instance_id, tmp_path / "volume")
        boxes.append(made)
        return made.start(tmp_path, Path(f"{keypair}.pub").read_text().strip())

    yield make
    for made in boxes:
        if made.container:
            docker("rm", "-f", made.container, check=False)
        if made.cloud.state(made.instance_id) is not None:
            made.cloud.provider.terminate(made.box)  # what `lenslab down` does: no instance is left


STOP_ACTIONS = {"runpod": "runpod-stop", "vast": "vast-stop"}


@pytest.mark.slow
@pytest.mark.parametrize("how", ["default", "stop"])
def test_idle_box_stops_its_own_instance_through_the_api(make_box: Any, how: str) -> None:
    box = make_box(idle_minutes=0.01)
    changes = {"action": STOP_ACTIONS[box.cloud.name]} if how == "stop" else {}
    settings = box.install(**changes)
    box.wait_for("stopped" if how == "stop" else None)
    assert (
        box.state()["acted"] == f"stopped 0 training container(s) and 0 supervised run(s); action {settings['action']}"
    )
    assert autostop.read_state(ExecRunner(box.container)) == box.state()  # what `lenslab status` reads
    # The default is what `lenslab down` does: terminate (the volume or the mirror keeps the data).
    assert settings["action"] == changes.get(
        "action", {"runpod": "runpod-terminate", "vast": "vast-destroy"}[box.cloud.name]
    )
    # The key sits on the volume, the box user's only, and nowhere else: not in the settings,
    # not in any process's command line.
    key_file = box.volume / ".lenslab" / f"{box.cloud.name}-api-key"
    assert key_file.read_text() == box.cloud.emulator.api_key and key_file.stat().st_mode & 0o777 == 0o600
    assert (box.volume / ".lenslab" / "autostop.json").stat().st_mode & 0o777 == 0o600
    assert box.cloud.emulator.api_key not in (box.volume / ".lenslab" / "autostop.json").read_text()
    if how == "stop":  # the stopped container still runs here (the emulator keeps it): look at it
        listing = docker("exec", box.container, "ps", "-eo", "args").stdout
        assert "autostop.py" in listing and box.cloud.emulator.api_key not in listing


@pytest.mark.slow
def test_budget_reached_stops_a_busy_box(make_box: Any, keypair: Path) -> None:
    """budget_usd counts what the box's earlier instances cost (the laptop's ledger): with
    $4.9999 of $5 spent before, this instance's first seconds reach it, SSH session or not."""
    box = make_box(idle_minutes=60, budget_usd=5.0)
    ledger = container_ledger.read(box.cloud.name, box.cfg.name)
    container_ledger.write(box.cloud.name, box.cfg.name, dataclasses.replace(ledger, spent_usd=4.9999))
    client = box.session(keypair)
    try:
        box.install()
        box.wait_for(None)
    finally:
        client.close()
    acted = box.state()["acted"]
    assert acted.startswith("budget_usd $5.00 reached ($5.00 spent): stopped 0 training container(s)"), acted


@pytest.mark.slow
def test_open_session_keeps_the_box_up_and_a_posing_process_does_not(make_box: Any, keypair: Path) -> None:
    box = make_box(idle_minutes=0.01)
    # The box user's own impostor: a copy of sleep named sshd, titled like a session.
    posing = "cp /bin/sleep /tmp/sshd && exec -a 'sshd: debian@notty' /tmp/sshd 300"
    docker("exec", "-d", "--user", "debian", box.container, "bash", "-c", posing)
    client = box.session(keypair)
    try:
        box.install()
        deadline = time.monotonic() + ACT_SECONDS
        while box.state().get("busy") != ["1 SSH session(s)"]:
            assert time.monotonic() < deadline, (box.state(), box.log())
            time.sleep(0.2)
        time.sleep(2)  # many checks (every 0.2 s) with the session open
        assert box.cloud.state(box.instance_id) == "running"
        assert box.state()["busy"] == ["1 SSH session(s)"] and not box.state().get("acted")
    finally:
        client.close()
    assert "sshd: debian@notty" in docker("exec", box.container, "ps", "-eo", "args").stdout  # still posing
    box.wait_for(None)  # the session closed: idle, terminated


# -- without containers: the API calls, the settings files, the watcher's start --------------------


@pytest.fixture
def watcher() -> Any:
    return _load_watcher()


def _api_settings(cloud: Cloud, key_file: Path, action: str) -> dict[str, Any]:
    url = cloud.emulator.graphql_url if isinstance(cloud.emulator, RunPodEmulator) else cloud.emulator.url
    return {"action": action, "api_url": url, "key_file": str(key_file),
            "instance_id_env": cloud.provider.instance_id_env,
            "train_label": f"lenslab.test={uuid.uuid4().hex}"}  # fmt: skip


@pytest.mark.parametrize("how", ["default", "stop"])
def test_api_calls_stop_or_terminate_the_instance(
    cloud: Cloud, watcher: Any, tmp_path: Path, keypair: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    cfg = BoxConfig(name="t", provider=cloud.name, identity_file=str(keypair), mirror="s3://b/l")
    box = cloud.provider.launch(cfg)
    instance_id = container_ledger.read(cloud.name, "t").instance_id
    key_file = tmp_path / "key"
    key_file.write_text(cloud.emulator.api_key)
    action = STOP_ACTIONS[cloud.name] if how == "stop" else cloud.provider.autostop_action
    monkeypatch.setenv(cloud.provider.instance_id_env, instance_id)
    assert watcher.act(_api_settings(cloud, key_file, action)) == f"stopped 0 training container(s); action {action}"
    assert cloud.state(instance_id) == ("stopped" if how == "stop" else None)
    if how == "stop":
        cloud.provider.terminate(box)


def _instance_env(cloud: Cloud, instance_id: str) -> dict[str, str]:
    """The environment the instance was created with, as the provider's API holds it."""
    if isinstance(cloud.emulator, RunPodEmulator):
        return {e["key"]: e["value"] for e in cloud.emulator.pods[instance_id]["_spec"]["env"]}
    return {
        k: v for k, v in cloud.emulator.instances[int(instance_id)]["_body"]["env"].items() if not k.startswith("-")
    }


@pytest.mark.parametrize("mode", ["box", "laptop"])
def test_an_instance_stops_itself_with_the_settings_it_was_created_with(
    cloud: Cloud, watcher: Any, tmp_path: Path, keypair: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """No settings file yet (the laptop vanished right after the launch): the create-time ones
    apply; the key is in the provider's variable only, and only with autostop = "box"."""
    fields = {"autostop": mode, "idle_minutes": 5, "budget_usd": 50}
    cfg = BoxConfig.model_validate(
        {"name": "t", "provider": cloud.name, "identity_file": str(keypair), "mirror": "s3://b/l", **fields}
    )
    box = cloud.provider.launch(cfg)
    instance_id = container_ledger.read(cloud.name, "t").instance_id
    env = _instance_env(cloud, instance_id)
    key_env = cloud.provider.capabilities.api_key_env
    assert key_env is not None and cloud.emulator.api_key not in env["LENSLAB_AUTOSTOP"]
    assert (env.get(key_env) == cloud.emulator.api_key) == (mode == "box") and (key_env in env) == (mode == "box")
    monkeypatch.delenv(key_env)
    for name, value in {**env, cloud.provider.instance_id_env: instance_id}.items():
        monkeypatch.setenv(name, value)
    settings = watcher.waited_settings(str(tmp_path / "none-yet.json"))
    assert settings["idle_minutes"] == 5 and settings["budget_usd"] == 50 and settings["launched_at"] > 0
    assert settings["price_per_hour_usd"] > 0 and "key_file" not in settings
    assert settings["state_file"] == "/lab/.lenslab/autostop-state.json"
    settings = {**settings, "box_command": None, "train_label": f"lenslab.test={uuid.uuid4().hex}"}
    action = cloud.provider.autostop_action if mode == "box" else "none"
    assert watcher.act(settings) == f"stopped 0 training container(s); action {action}"
    assert cloud.state(instance_id) == (None if mode == "box" else "running")
    off = tmp_path / "off.json"
    autostop.install_in_container(LocalRunner(), str(tmp_path / "lab"), None, None, None)
    off.write_text((tmp_path / "lab" / ".lenslab" / "autostop.json").read_text())
    assert watcher.waited_settings(str(off)) is None  # autostop = "off" later: the create-time ones go too
    if mode == "laptop":
        cloud.provider.terminate(box)


def test_a_refused_call_is_recorded_and_tried_again(cloud: Cloud, watcher: Any, tmp_path: Path, keypair: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    cfg = BoxConfig(name="t", provider=cloud.name, identity_file=str(keypair), mirror="s3://b/l")
    cloud.provider.launch(cfg)
    instance_id = container_ledger.read(cloud.name, "t").instance_id
    monkeypatch.setenv(cloud.provider.instance_id_env, instance_id)
    key_file = tmp_path / "key"
    key_file.write_text("not-the-key")
    settings = _api_settings(cloud, key_file, cloud.provider.autostop_action)
    state = watcher._acting(settings, {"stop_at": 1.0}, None)
    assert state["acted"] is None and "401" in state["error"] and "not-the-key" not in state["error"]
    assert cloud.state(instance_id) == "running"
    key_file.write_text(cloud.emulator.api_key)  # the next check's try
    state = watcher._acting(settings, state, None)
    assert state["acted"].endswith(f"action {cloud.provider.autostop_action}") and state["error"] is None
    assert cloud.state(instance_id) is None


def test_budget_counts_what_was_spent_before(watcher: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    now = 10_000.0
    cfg = {"budget_usd": 5.0, "launched_at": now - 3600, "price_per_hour_usd": 1.0, "spent_before_usd": 3.5,
           "instance_id": "p1", "instance_id_env": "RUNPOD_POD_ID"}  # fmt: skip
    monkeypatch.setenv("RUNPOD_POD_ID", "p1")
    assert watcher.over_budget(cfg, now) is None  # $4.50 of $5
    assert watcher.over_budget(cfg, now + 1800) == "budget_usd $5.00 reached ($5.00 spent)"
    monkeypatch.setenv("RUNPOD_POD_ID", "p2")  # a new pod on the same volume, settings not rewritten yet
    assert watcher.over_budget(cfg, now + 1800) is None


def test_settings_and_key_on_the_volume(tmp_path: Path) -> None:
    root = str(tmp_path / "lab")
    got = autostop.install_in_container(LocalRunner(), root, {"action": "vast-destroy"}, "k-123", "vast-api-key")
    assert got == {"autostop": "lenslab-box serve", "action": "vast-destroy"}
    where = tmp_path / "lab" / ".lenslab"
    settings = json.loads((where / "autostop.json").read_text())
    assert settings["key_file"] == f"{root}/.lenslab/vast-api-key" and "k-123" not in json.dumps(settings)
    assert settings["box_command"] == ["lenslab-box", "--root", root]
    assert (where / "vast-api-key").read_text() == "k-123"
    assert {p.name: p.stat().st_mode & 0o777 for p in where.iterdir()} == {
        "autostop.json": 0o600,
        "vast-api-key": 0o600,
    }
    # autostop = "laptop": no key on the box any more; autostop = "off": no settings either.
    autostop.install_in_container(LocalRunner(), root, {"action": "none"}, None, "vast-api-key")
    assert sorted(p.name for p in where.iterdir()) == ["autostop.json"]
    (where / "autostop-state.json").write_text("{}")
    assert autostop.install_in_container(LocalRunner(), root, None, None, "vast-api-key") == {"autostop": "off"}
    assert [p.name for p in where.iterdir()] == ["autostop.json"]  # saying "off", over the create-time settings
    assert json.loads((where / "autostop.json").read_text()) == {"off": True}


@pytest.mark.slow  # seconds of real processes: outside the fast lane
def test_serve_starts_the_watcher_which_waits_for_its_settings(tmp_path: Path) -> None:
    """`lenslab-box serve`'s child: it starts before the laptop wrote settings, and reads them
    at every check (here: where its state goes)."""
    from lenslab_workspace.box.watcher import Watcher

    root = tmp_path / "lab"
    child = Watcher(root)
    child.ensure()
    try:
        time.sleep(0.5)
        assert child.child is not None and child.child.poll() is None  # waiting, not failing
        base = {"action": "none", "idle_minutes": 60, "check_every_seconds": 0.1,
                "train_label": f"lenslab.test={uuid.uuid4().hex}"}  # fmt: skip
        for name in ("first.json", "second.json"):
            settings = {**base, "state_file": str(root / name)}
            (root / ".lenslab" / "autostop.json").write_text(json.dumps(settings))
            deadline = time.monotonic() + ACT_SECONDS
            while not (root / name).exists():
                assert time.monotonic() < deadline, (root / ".lenslab" / "autostop.log").read_text()
                time.sleep(0.1)
        first = child.child.pid
        child.ensure()
        assert child.child.pid == first  # one watcher
    finally:
        child.stop()
    assert child.child.poll() is not None
    assert os.path.exists(root / ".lenslab" / "autostop.log")
