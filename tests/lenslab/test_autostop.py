"""The autostop watcher on a real box: an SSH session or a training container keeps it up; an
idle box is stopped (here: its Lambda instance terminated through the API emulator)."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
            "ssh_ports": [vm.port],
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
def watcher(vm: VM, cloud: LambdaEmulator) -> Watcher:
    return Watcher(vm, cloud)


def test_open_ssh_session_keeps_the_box_up(watcher: Watcher, keypair: Path, cloud: LambdaEmulator) -> None:
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    kind, blob = watcher.vm.exec("cat /etc/ssh/ssh_host_ed25519_key.pub").stdout.split()[:2]
    client.get_host_keys().add(f"[127.0.0.1]:{watcher.vm.port}", kind, paramiko.Ed25519Key(data=base64.b64decode(blob)))
    client.connect("127.0.0.1", port=watcher.vm.port, username="debian", key_filename=str(keypair))
    try:
        state = watcher.run("--once")
    finally:
        client.close()
    assert state["busy"] == ["1 SSH connection(s)"]
    assert state["stop_at"] is None
    assert watcher.instance_id in cloud.instances


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
