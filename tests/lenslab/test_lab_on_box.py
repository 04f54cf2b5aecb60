"""The lab on a box, end to end: real sshd, the host's real Docker Engine, lenslab's own image.

`lenslab up` builds (or reuses) the image over the SSH link and starts the dev container;
`lenslab jupyter` tunnels to it; `lenslab train` runs detached, survives a crash, a dropped link
and the loss of the whole box, and `lenslab pull` brings back an SAE equal to an uninterrupted
run's.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from labkit import (
    container_state,
    imagekit,
    persistent_root,
    read_status,
    remove_containers,
    start_box,
    tiny_run,
    wait_for,
    write_lab_config,
)
from lenslab_testkit import LENSLAB, VM, docker, free_port, lenslab, unique

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lab_context(tmp_path_factory: pytest.TempPathFactory, docker_ready: None) -> Iterator[Path]:
    """The image's build context as the image tests make it: local base image, CPU torch wheel."""
    import docker as sdk

    imagekit.ensure_base_image(sdk.from_env())
    yield imagekit.make_context(tmp_path_factory.mktemp("lab") / "context", imagekit.torch_wheel())
    # Images of earlier checkouts lost the tag to the current one: drop them so the disk does not fill.
    docker("image", "prune", "-f", "--filter", "label=lenslab.context-hash", check=False)


@pytest.fixture
def lab(tmp_path: Path, keypair: Path, project: Path, lab_context: Path) -> Iterator[dict[str, object]]:
    box = unique("bx")
    root = persistent_root(tmp_path / "persist")
    key = Path(str(keypair) + ".pub").read_text().strip()
    vms: list[VM] = [start_box(key, root)]
    write_lab_config(project, vms[0], box, root, lab_context, free_port())
    yield {"box": box, "root": root, "key": key, "vms": vms, "project": project}
    remove_containers(f"lenslab.box={box}")
    for vm in vms:
        vm.stop()


def test_up_starts_the_dev_container_and_jupyter_answers_through_the_tunnel(lab: dict[str, object]) -> None:
    box, root = str(lab["box"]), Path(str(lab["root"]))
    up = lenslab("up", "--json", timeout=900)
    assert up.returncode == 0, up.stderr
    first = json.loads(up.stdout)["bootstrap"]["lab"]
    assert first["dev_container"] == f"lenslab-dev-{box}" and first["action"] == "started"

    info = json.loads(docker("inspect", f"lenslab-dev-{box}").stdout)[0]
    assert info["State"]["Running"]
    assert info["Config"]["Labels"]["lenslab.box"] == box
    assert info["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped"
    assert info["HostConfig"]["NetworkMode"] == "host"
    assert [(m["Source"], m["Destination"]) for m in info["Mounts"]] == [(str(root), "/lab")]
    # This host has no GPU, so none is requested (a GPU box gets DeviceRequest(count=-1)).
    assert not info["HostConfig"]["DeviceRequests"]

    started = time.monotonic()
    again = lenslab("up", "--json")
    assert again.returncode == 0, again.stderr
    second = json.loads(again.stdout)["bootstrap"]["lab"]
    assert second["action"] == "kept" and second["image_built"] is False
    assert time.monotonic() - started < 10

    port = free_port()
    with subprocess.Popen([LENSLAB, "jupyter", "--port", str(port)], stdout=subprocess.PIPE, text=True) as tunnel:
        try:
            assert tunnel.stdout is not None
            # A hang here must fail the test, not stall it.
            timer = threading.Timer(60, tunnel.kill)
            timer.start()
            url = tunnel.stdout.readline().strip()
            timer.cancel()
            assert url.startswith(f"http://127.0.0.1:{port}/lab?token=")
            token = url.split("token=", 1)[1]
            status = wait_for("Jupyter to answer", lambda: _api_status(port, token), timeout=180, interval=0.5)
            assert "started" in status
        finally:
            tunnel.terminate()

    down = lenslab("down")
    assert down.returncode == 0, down.stderr
    assert not json.loads(docker("inspect", f"lenslab-dev-{box}").stdout)[0]["State"]["Running"]


def _api_status(port: int, token: str) -> dict[str, object] | None:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/status", headers={"Authorization": f"token {token}"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            data: dict[str, object] = json.loads(response.read())
            return data
    except OSError:
        return None


def test_train_survives_a_crash_a_dropped_link_and_a_new_box(lab: dict[str, object], tmp_path: Path) -> None:
    root, project = Path(str(lab["root"])), Path(str(lab["project"]))
    vms: list[VM] = lab["vms"]  # type: ignore[assignment]
    run = unique("e2e")
    run_file = tiny_run(project / "run", training_tokens=600_000, checkpoint_every_tokens=40_000)
    name = f"lenslab-train-{run}"

    # The uninterrupted reference, trained here at the same time.
    reference = subprocess.Popen(
        [str(Path(LENSLAB).with_name("lenslab-train")), str(run_file), "--runs-dir", str(tmp_path / "ref")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert lenslab("up", timeout=900).returncode == 0

    # `train` returns once the trainer has reported in: minutes on a loaded machine.
    started = lenslab("train", str(run_file), "--name", run, timeout=600)
    assert started.returncode == 0, started.stderr
    again = lenslab("train", str(run_file), "--name", run)
    assert again.returncode == 8
    assert again.stderr == (
        f"lenslab: error: run {run} is already running on box {lab['box']}; follow it with "
        f"`lenslab logs {run} -f`, stop it with `lenslab stop {run}`, or pick another --name\n"
    )

    # A crash (what the OOM killer does): Docker restarts it and it resumes.
    wait_for("a first checkpoint", lambda: read_status(root, run).get("last_checkpoint"), timeout=600)
    subprocess.run(["kill", "-9", str(container_state(name)["Pid"])], check=True)
    wait_for("the restart", lambda: container_state(name).get("RestartCount", 0) >= 1, timeout=120)
    log = root / "runs" / run / "train.log"
    wait_for("the resume", lambda: "resuming from step-" in log.read_text(), timeout=600)

    # A graceful stop: SIGTERM, a checkpoint, exit 75, and no restart.
    stopped = lenslab("stop", run)
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.startswith(f"run {run} stopped with a checkpoint")
    assert container_state(name)["Status"] == "exited"

    # The box dies with everything on it but the persistent root; a new box takes its place.
    docker("rm", "-f", name)
    vms[0].stop()
    vms.append(start_box(str(lab["key"]), root))
    text = (project / "lenslab.toml").read_text().replace(f"port = {vms[0].port}", f"port = {vms[1].port}")
    (project / "lenslab.toml").write_text(text)
    assert lenslab("up", timeout=900).returncode == 0
    resumed = lenslab("train", str(run_file), "--name", run, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    wait_for("the resume on the new box", lambda: log.read_text().count("resuming from step-") >= 2, timeout=300)
    runs = lenslab("runs")
    assert run in runs.stdout and "running" in runs.stdout, runs.stdout + runs.stderr

    _follow_across_a_dropped_link(vms[1], run)
    assert container_state(name)["ExitCode"] == 0

    assert reference.wait(timeout=600) == 0, reference.stderr.read() if reference.stderr else ""
    pulled = lenslab("pull", run)
    assert pulled.returncode == 0, pulled.stderr
    _assert_same_sae(project / "runs" / run / "final", tmp_path / "ref" / "tiny" / "final")


def _follow_across_a_dropped_link(vm: VM, run: str) -> None:
    """`logs -f` while sshd drops every session: it reconnects and follows to the run's end."""
    with subprocess.Popen([LENSLAB, "logs", run, "-f"], stdout=subprocess.PIPE, stderr=subprocess.PIPE) as logs:
        assert logs.stdout is not None and logs.stderr is not None
        out: list[bytes] = []
        reader = threading.Thread(target=lambda: out.extend(iter(logs.stdout.readline, b"")), daemon=True)  # type: ignore[union-attr]
        reader.start()
        wait_for("log lines", lambda: len(out) > 3, timeout=180)
        vm.exec("pkill -f 'sshd: debian'")
        seen = len(out)
        try:
            # Until the run ends: the rest of the training, on a loaded machine minutes.
            code = logs.wait(timeout=900)
        except subprocess.TimeoutExpired:
            logs.kill()
            raise AssertionError(f"`logs -f` did not end: {logs.stderr.read().decode()[-2000:]}") from None
        reader.join(timeout=5)
        err = logs.stderr.read().decode()
    assert code == 0, err
    assert "lost the link to the box" in err and "reconnecting" in err
    assert len(out) > seen, "no log lines after the reconnect"
    assert any(b"finished" in line for line in out[seen:])


def _assert_same_sae(pulled: Path, reference: Path) -> None:
    import torch
    from sae_lens import SAE

    got = SAE.load_from_disk(str(pulled), device="cpu")
    want = SAE.load_from_disk(str(reference), device="cpu")
    for key, value in want.state_dict().items():
        assert torch.equal(got.state_dict()[key], value), key


def test_a_launch_whose_trainer_never_reports_in_fails_and_runs_shows_it(lab: dict[str, object]) -> None:
    """The trainer refuses the run before writing any status (its run directory's saved config
    is damaged), under the status.json an earlier launch left: `train` must not say "started",
    and `runs` must show the container that exited, not the old "interrupted"."""
    root, project = Path(str(lab["root"])), Path(str(lab["project"]))
    run = unique("early")
    run_file = tiny_run(project / "run", training_tokens=20_000, checkpoint_every_tokens=10_000)
    run_dir = root / "runs" / run
    run_dir.mkdir(parents=True)
    (run_dir / "run-config.json").write_text("{damaged")
    earlier = {"name": run, "state": "interrupted", "started_at": time.time() - 600, "updated_at": time.time() - 500}
    (run_dir / "status.json").write_text(json.dumps(earlier))
    # What a hostile or odd box may hold next to it: none of it is a run.
    for name, status in (("bad\nname", {"name": "bad\nname", "state": "running"}), ("other", {"name": run})):
        (root / "runs" / name).mkdir()
        (root / "runs" / name / "status.json").write_text(json.dumps(status))
    assert lenslab("up", timeout=900).returncode == 0

    started = lenslab("train", str(run_file), "--name", run, timeout=600)
    assert started.returncode == 1, started.stdout + started.stderr
    first, *tail = started.stderr.splitlines()
    assert first.startswith(f"lenslab: error: run {run} did not start: its container "), first
    assert "before the trainer wrote its status" in first and first.endswith("run `lenslab train` again")
    assert tail and all(line.startswith("  | ") for line in tail), started.stderr
    assert started.stdout == ""
    assert json.loads((run_dir / "status.json").read_text()) == earlier

    listed = lenslab("runs", "--json")
    assert listed.returncode == 0, listed.stderr
    (entry,) = json.loads(listed.stdout)["runs"]
    assert entry["name"] == run and entry["state"] == "interrupted"
    assert entry["container"]["state"] == "exited" and entry["container"]["exit_code"] not in (0, None)
    table = lenslab("runs")
    assert table.returncode == 0, table.stderr
    (row,) = table.stdout.splitlines()[1:]
    assert row.split()[0] == run
    assert f"exited ({entry['container']['exit_code']}) before starting" in row
