"""`lenslab up/status/down --provider lambda` against the Lambda API emulator, whose instances
are real fresh-VM containers and whose file systems are host directories that outlive them."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lambdakit import API_KEY, Cloud, lambda_cloud
from lenslab_testkit import VM, docker, free_port, lenslab


@pytest.fixture
def cloud(tmp_path: Path, vm_factory: type[VM], project: Path, home: Path) -> Iterator[Cloud]:
    with lambda_cloud(tmp_path, vm_factory, project, home) as cloud:
        yield cloud


@pytest.mark.slow
def test_up_status_down_up_keeps_the_file_system(cloud: Cloud) -> None:
    up = cloud.run("up", "--yes")
    assert up.returncode == 0, up.stderr
    assert "box gpu is ready" in up.stdout
    assert cloud.launches() == 1
    (vm,) = cloud.vms.values()
    vm.exec("echo checkpoint > /lambda/nfs/lenslab-proj/runs/marker", user="debian")

    again = cloud.run("up", "--yes")
    assert again.returncode == 0, again.stderr
    assert "changed: nothing" in again.stdout
    assert cloud.launches() == 1  # the running instance was reused

    status = cloud.run("status", "--json")
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    assert data["reachable"] and data["root"] == "/lambda/nfs/lenslab-proj"
    assert data["cost"]["price_per_hour_usd"] == 1.29 and data["cost"]["instance_type"] == "gpu_1x_a100_sxm4"
    assert data["cost"]["budget_usd"] == 0.01

    down = cloud.run("down")
    assert down.returncode == 0, down.stderr
    assert down.stdout.strip().startswith("box gpu is down: terminated the instance, stopped 0 container(s)")
    assert "the file system stays, billed by Lambda per GB-month" in down.stdout
    assert cloud.vms == {} and cloud.emulator.instances == {}
    assert [fs["name"] for fs in cloud.emulator.file_systems.values()] == ["lenslab-proj"]

    # A new instance (new host keys on the same address) with the same file system.
    back = cloud.run("up", "--yes")
    assert back.returncode == 0, back.stderr
    assert cloud.launches() == 2
    (vm,) = cloud.vms.values()
    assert vm.exec("cat /lambda/nfs/lenslab-proj/runs/marker", user="debian").stdout.strip() == "checkpoint"

    assert cloud.run("down").returncode == 0
    gone = cloud.run("down")
    assert gone.returncode == 0
    assert gone.stdout.strip() == "box gpu is not running; nothing to stop"
    purge = cloud.run("down", "--purge", "--yes")
    assert purge.returncode == 0, purge.stderr
    assert purge.stdout.strip() == "box gpu is not running; nothing to stop; deleted file system lenslab-proj"
    assert cloud.emulator.file_systems == {}


def test_launch_needs_consent(cloud: Cloud) -> None:
    refused = cloud.run("up")
    assert refused.returncode == 5
    assert refused.stderr.strip() == (
        "lenslab: error: not launched: lenslab would launch gpu_1x_a100_sxm4 (1x A100 (40 GB SXM4)) in "
        "us-east-1 at $1.29/hour; and create file system lenslab-proj there, register your lenslab SSH key "
        "as lenslab-gpu; re-run with --yes to accept"
    )
    assert cloud.launches() == 0 and cloud.emulator.file_systems == {}


def test_status_of_a_box_not_running_launches_nothing(cloud: Cloud) -> None:
    status = cloud.run("status")
    assert status.returncode == 0
    assert status.stdout.strip() == "box gpu: not running (`lenslab up` starts it)"
    assert cloud.launches() == 0


def test_invalid_key_is_one_line(cloud: Cloud) -> None:
    result = lenslab("status", env={"LAMBDA_API_KEY": "wrong-key-123", "LAMBDA_API_URL": cloud.emulator.url})
    assert result.returncode == 5
    assert result.stderr.strip() == (
        "lenslab: error: Lambda Cloud: API key was invalid, expired, or deleted (global/invalid-api-key); "
        "set LAMBDA_API_KEY (or the key file) to a valid key from https://cloud.lambda.ai/api-keys"
    )


def test_missing_key_is_one_line(cloud: Cloud) -> None:
    result = lenslab("status", env={"LAMBDA_API_KEY": "", "LAMBDA_API_URL": cloud.emulator.url})
    assert result.returncode == 2
    assert result.stderr.strip().startswith("lenslab: error: no Lambda Cloud API key: set LAMBDA_API_KEY, or write")


def test_budget_warning_from_80_percent() -> None:
    from lenslab.cli.status import _cost_line, _with_budget

    cost = {"price_per_hour_usd": 2.0, "billed_hours": 4.1, "cost_usd": 8.2, "instance_type": "t", "region": "r"}
    assert _with_budget(cost, 20.0)["budget_warning"] is None
    warned = _with_budget(cost, 10.0)
    assert warned["budget_used_fraction"] == 0.82
    assert _cost_line(warned).splitlines() == [
        "cost:   $2.00/hour (t, r), 4.10 h so far = $8.20",
        "  warning: 82% of budget_usd $10.00 spent; `lenslab down` stops the billing",
    ]


def test_cost_of_an_instance_found_running_has_no_hours() -> None:
    from lenslab.cli.status import _cost_line, _with_budget

    cost = {"price_per_hour_usd": 1.29, "billed_hours": None, "cost_usd": None, "instance_type": "t", "region": "r"}
    assert _with_budget(cost, 10.0) == cost  # no launch time: no budget arithmetic on a guess
    assert _cost_line(cost) == "cost:   $1.29/hour (t, r), launched elsewhere: hours so far unknown"


def test_init_writes_a_lambda_box(project: Path) -> None:
    result = lenslab("init", "--name", "a100", "--provider", "lambda")
    assert result.returncode == 0, result.stderr
    from lenslab.config import load

    box = load(project / "lenslab.toml").box
    assert (box.provider, box.gpu_types, box.regions) == ("lambda", ["A100", "H100", "A10"], None)


@pytest.mark.slow
def test_idle_box_terminates_itself(cloud: Cloud, project: Path) -> None:
    config = project / "lenslab.toml"
    config.write_text(config.read_text() + "idle_minutes = 0.05\n")
    up = cloud.run("up", "--yes", "--json")
    assert up.returncode == 0, up.stderr
    assert json.loads(up.stdout)["bootstrap"]["autostop"] == {"autostop": "detached", "changed": True}
    (vm,) = cloud.vms.values()
    # Only root can read the key the box uses to terminate itself.
    assert vm.exec("cat /etc/lenslab/lambda-api-key", user="debian").returncode != 0
    assert vm.exec("stat -c %a /etc/lenslab/lambda-api-key").stdout.strip() == "600"
    deadline = time.monotonic() + 60
    while cloud.emulator.instances and time.monotonic() < deadline:
        time.sleep(0.5)
    assert cloud.emulator.instances == {}, "the idle box did not terminate itself"
    assert [fs["name"] for fs in cloud.emulator.file_systems.values()] == ["lenslab-proj"]


def test_laptop_autostop_keeps_the_key_off_the_box(cloud: Cloud, project: Path) -> None:
    config = project / "lenslab.toml"
    config.write_text(config.read_text() + 'autostop = "laptop"\n')
    up = cloud.run("up", "--yes", "--json")
    assert up.returncode == 0, up.stderr
    (vm,) = cloud.vms.values()
    assert vm.exec("test -e /etc/lenslab/lambda-api-key").returncode == 1
    settings = json.loads(vm.exec("cat /etc/lenslab/autostop.json").stdout)
    assert settings["action"] == "none" and API_KEY not in json.dumps(settings)
    again = cloud.run("up", "--yes", "--json")
    assert json.loads(again.stdout)["bootstrap"]["autostop"]["changed"] is False


@pytest.mark.slow
def test_laptop_autostop_terminates_from_status(cloud: Cloud, project: Path) -> None:
    config = project / "lenslab.toml"
    config.write_text(config.read_text() + 'autostop = "laptop"\nidle_minutes = 0.05\n')
    assert cloud.run("up", "--yes").returncode == 0
    (vm,) = cloud.vms.values()
    deadline = time.monotonic() + 60
    state: dict[str, Any] = {}
    while not state.get("acted") and time.monotonic() < deadline:
        time.sleep(0.5)
        state = json.loads(vm.exec("cat /var/lib/lenslab/autostop.json").stdout or "{}")
    assert state["acted"] == "stopped 0 training container(s); action none"
    assert cloud.emulator.instances, "without the key the box must not have terminated itself"
    status = cloud.run("status", "--json")
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    assert data["terminated"] is True
    assert data["autostop_text"].endswith("; lenslab terminated the idle instance")
    assert cloud.emulator.instances == {}


# Runs in the dev container: starts a kernel through Jupyter's REST API and has it execute a
# long sleep over the kernel's websocket, so the server reports it busy.
BUSY_KERNEL = """
import asyncio, json, os, time, urllib.request, uuid
from tornado.websocket import websocket_connect
argv = open("/proc/1/cmdline").read().split("\\0")
base = "127.0.0.1:" + next(a.split("=", 1)[1] for a in argv if a.startswith("--port="))
token = os.environ["JUPYTER_TOKEN"]
auth = {"Authorization": "token " + token}
def call(path, data=None):
    request = urllib.request.Request("http://" + base + path, data=data, headers=auth, method="POST" if data else "GET")
    return json.load(urllib.request.urlopen(request, timeout=60))
for _ in range(150):  # Jupyter may still be starting
    try:
        call("/api/status")
        break
    except OSError:
        time.sleep(0.2)
kernel = call("/api/kernels", b"{}")["id"]
async def main():
    ws = await websocket_connect("ws://" + base + "/api/kernels/" + kernel + "/channels?token=" + token)
    header = {"msg_id": uuid.uuid4().hex, "username": "t", "session": uuid.uuid4().hex,
              "msg_type": "execute_request", "version": "5.3"}
    content = {"code": "import time; time.sleep(300)", "silent": False, "store_history": False,
               "user_expressions": {}, "allow_stdin": False, "stop_on_error": True}
    await ws.write_message(json.dumps({"header": header, "parent_header": {}, "metadata": {},
                                       "content": content, "channel": "shell", "buffers": []}))
    for _ in range(300):
        if call("/api/kernels/" + kernel)["execution_state"] == "busy":
            return
        await asyncio.sleep(0.2)
    raise SystemExit("the kernel never became busy")
asyncio.run(main())
"""


@pytest.fixture
def lab_cloud(cloud: Cloud, project: Path, docker_ready: None) -> Iterator[Cloud]:
    """The cloud above, with lenslab's image and a persistent root the host engine can mount:
    the file system's host directory, at the same path in the instance (as labkit explains)."""
    import docker as sdk
    from labkit import imagekit, persistent_root

    imagekit.ensure_base_image(sdk.from_env())
    context = imagekit.make_context(project.parent / "context", imagekit.torch_wheel())
    root = persistent_root(cloud.emulator.fs_root / "lenslab-proj")
    cloud.extra_volumes = [f"{root}:{root}"]
    args = {"BASE_IMAGE": imagekit.BASE_IMAGE, "TORCH_SPEC": imagekit.torch_spec(imagekit.torch_wheel())}
    build_args = ", ".join(f'{k} = "{v}"' for k, v in args.items())
    config = project / "lenslab.toml"
    # No budget here: $0.01 is 28 s of this instance, after which the box's watcher stops every
    # training container and terminates the instance by itself, in the middle of the test.
    config.write_text(
        config.read_text().replace("budget_usd = 0.01\n", "")
        + f'root = "{root}"\nmin_free_gb = 0\nimage = "lenslab-box-test:latest"\nbuild_context = "{context}"\n'
        + f"jupyter_port = {free_port()}\nbuild_args = {{ {build_args} }}\n"
    )
    yield cloud
    ids = docker("ps", "-aq", "--filter", "label=lenslab.box=gpu", check=False).stdout.split()
    if ids:
        docker("rm", "-f", *ids, check=False)


@pytest.mark.slow
def test_full_path_train_down_up_resumes(lab_cloud: Cloud, project: Path, tmp_path: Path) -> None:
    from labkit import read_status, tiny_run, wait_for

    cloud = lab_cloud
    root = cloud.emulator.fs_root / "lenslab-proj"
    run_file = tiny_run(tmp_path / "run", training_tokens=300_000, checkpoint_every_tokens=20_000)
    # Waits sized for a loaded machine: an image build, and a trainer importing torch, take minutes there.
    up = cloud.run("up", "--yes", timeout=900)
    assert up.returncode == 0, up.stderr
    # A busy Jupyter kernel in the dev container keeps the box up.
    (vm,) = cloud.vms.values()
    busy = docker("exec", "lenslab-dev-gpu", "python", "-c", BUSY_KERNEL, check=False)
    assert busy.returncode == 0, busy.stderr
    watcher = vm.exec("python3 /usr/local/lib/lenslab/autostop.py --once --config /etc/lenslab/autostop.json")
    assert json.loads(watcher.stdout.splitlines()[-1])["busy"] == ["1 Jupyter kernel(s) busy"], watcher.stderr
    started = cloud.run("train", str(run_file), "--wait", "400", timeout=600)
    assert started.returncode == 0, started.stderr
    wait_for("a checkpoint", lambda: (read_status(root, "tiny").get("last_checkpoint") or {}).get("step"), 600)

    down = cloud.run("down", timeout=600)
    assert down.returncode == 0, down.stderr
    assert "terminated the instance, stopped 2 container(s)" in down.stdout  # dev + training
    stopped = read_status(root, "tiny")
    assert stopped["state"] == "interrupted"  # the graceful stop wrote a checkpoint first

    back = cloud.run("up", "--yes", timeout=900)
    assert back.returncode == 0, back.stderr
    assert cloud.launches() == 2
    # `train` returns once the trainer of this launch has written its status (or fails).
    again = cloud.run("train", str(run_file), "--wait", "400", timeout=600)
    assert again.returncode == 0, again.stderr
    assert read_status(root, "tiny")["started_at"] > stopped["updated_at"]
    wait_for("the run to finish", lambda: read_status(root, "tiny").get("state") == "finished", 900)
    log = (root / "runs" / "tiny" / "train.log").read_text()
    assert f"resuming from step-{stopped['last_checkpoint']['step']:09d}" in log
    pulled = cloud.run("pull", "tiny", "--dest", str(tmp_path / "pulled"))
    assert pulled.returncode == 0, pulled.stderr
    assert (tmp_path / "pulled" / "sae_weights.safetensors").exists() or (
        tmp_path / "pulled" / "final" / "sae_weights.safetensors"
    ).exists()


def test_ssh_to_a_box_not_running_launches_nothing(cloud: Cloud) -> None:
    result = cloud.run("ssh", "--", "true")
    assert result.returncode == 5
    assert result.stderr.strip() == "lenslab: error: box gpu is not running; start it with `lenslab up`"
    assert cloud.launches() == 0
