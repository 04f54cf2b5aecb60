"""A box without a Docker engine, end to end: a container of lenslab's own image started with
`lenslab-box serve` (as RunPod and vast.ai start one), its volume a host directory at /lab,
sshd on 2222 published on 127.0.0.1, and lenslab.toml's `engine = "none"`.

`up` checks lenslab-box and writes the ssh entry (no Docker bootstrap); `train` starts a
supervised run; `stop` checkpoints it; `train` resumes it; `logs -f` ends with the run; `pull`
brings back an SAE equal to an uninterrupted run's. A kill -9 of the trainer is restarted by
the supervisor, and a restarted container continues the run it was meant to run.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from labkit import imagekit, persistent_root, read_status, tiny_run, wait_for
from lenslab_testkit import LENSLAB, docker, free_port, lenslab, unique

pytestmark = pytest.mark.slow

LABEL = "lenslab.test=container-box"
SSHD_READY_SECONDS = 60.0


@pytest.fixture(scope="module")
def box_image(tmp_path_factory: pytest.TempPathFactory, docker_ready: None) -> str:
    """lenslab's image for this checkout (built as the image tests build it, reused while unchanged)."""
    import docker as sdk

    client = sdk.from_env()
    base_id = imagekit.ensure_base_image(client)
    wheel = imagekit.torch_wheel()
    context = imagekit.make_context(tmp_path_factory.mktemp("cbox") / "context", wheel)
    args = {"BASE_IMAGE": imagekit.BASE_IMAGE, "TORCH_SPEC": imagekit.torch_spec(wheel)}
    tag: str = imagekit.build_cached(client, context, args, base_id).tag
    return tag


@dataclass
class ContainerBox:
    """One instance: a container of the image running `lenslab-box serve`, as the contract says."""

    image: str
    root: Path
    key: str
    container: str = ""
    port: int = 0
    extra: list[str] = field(default_factory=list)

    def start(self) -> ContainerBox:
        self.container = docker(
            "run", "-d", "--label", LABEL, "--user", "lab", "-e", f"LENSLAB_PUBLIC_KEY={self.key}",
            "-e", "LENSLAB_ROOT=/lab", "-e", "LENSLAB_BOX=cb", "-v", f"{self.root}:/lab",
            "-p", "127.0.0.1::2222", *self.extra, self.image, "lenslab-box", "serve",
        ).stdout.strip()  # fmt: skip
        self.wait_ready()
        return self

    def wait_ready(self) -> None:
        import socket

        deadline = time.monotonic() + SSHD_READY_SECONDS
        while time.monotonic() < deadline:
            mapped = docker("port", self.container, "2222/tcp", check=False).stdout.split()
            if mapped:
                self.port = int(mapped[0].rsplit(":", 1)[1])
                try:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                        if sock.recv(64).startswith(b"SSH-2.0-"):
                            return
                except OSError:
                    pass
            time.sleep(0.2)
        logs = docker("logs", self.container, check=False)
        raise RuntimeError(f"sshd in {self.container[:12]} did not start: {logs.stdout[-800:]}{logs.stderr[-800:]}")

    def restart(self) -> None:
        # The trainer gets the contract's stop timeout to checkpoint; Docker's default is 10 s.
        docker("restart", "-t", "150", self.container)
        self.wait_ready()

    def exec(self, command: str) -> subprocess.CompletedProcess[str]:
        done: subprocess.CompletedProcess[str] = docker(
            "exec", "-u", "lab", self.container, "bash", "-c", command, check=False
        )
        return done

    def stop(self) -> None:
        if self.container:
            docker("rm", "-f", self.container, check=False)


def write_config(project: Path, box: str, port: int) -> None:
    lines = ["[box]", f'name = "{box}"', 'provider = "ssh"', 'engine = "none"', 'host = "127.0.0.1"',
             'user = "lab"', f"port = {port}", 'root = "/lab"', "min_free_gb = 0"]  # fmt: skip
    (project / "lenslab.toml").write_text("\n".join(lines) + "\n")


@pytest.fixture
def cbox(tmp_path: Path, keypair: Path, project: Path, box_image: str) -> Iterator[dict[str, Any]]:
    name = unique("cb")
    root = persistent_root(tmp_path / "volume")
    key = Path(str(keypair) + ".pub").read_text().strip()
    instance = ContainerBox(box_image, root, key).start()
    write_config(project, name, instance.port)
    yield {"box": name, "root": root, "instance": instance, "project": project}
    instance.stop()


def supervisor(root: Path, run: str) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads((root / "runs" / run / "supervisor.json").read_text())
        return data
    except (OSError, ValueError):
        return {}


def test_train_stop_resume_logs_and_pull_on_a_box_without_docker(cbox: dict[str, Any], tmp_path: Path) -> None:
    root, project, box = Path(cbox["root"]), Path(cbox["project"]), str(cbox["box"])
    run = unique("cr")
    run_file = tiny_run(project / "run", training_tokens=300_000, checkpoint_every_tokens=40_000)
    reference = subprocess.Popen(
        [str(Path(LENSLAB).with_name("lenslab-train")), str(run_file), "--runs-dir", str(tmp_path / "ref")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip

    up = lenslab("up", "--json", timeout=300)
    assert up.returncode == 0, up.stderr
    summary = json.loads(up.stdout)["bootstrap"]
    assert summary["docker"] == "none" and summary["root"] == "/lab" and summary["lab"]["engine"] == "none"
    ssh_config = (Path.home() / ".ssh" / "lenslab" / "config").read_text()
    assert f"Host lenslab-{box}" in ssh_config and "User lab" in ssh_config
    # VSCode and `lenslab ssh` land in the image's environment, lenslab-box on PATH.
    shell = lenslab("ssh", "--", "bash", "-c", "command -v lenslab-box && echo $LENSLAB_ROOT")
    assert shell.returncode == 0 and shell.stdout.split()[-1] == "/lab", shell.stdout + shell.stderr

    started = lenslab("train", str(run_file), "--name", run, timeout=600)
    assert started.returncode == 0, started.stderr
    assert f"run {run} started on box {box} (supervised process" in started.stdout
    again = lenslab("train", str(run_file), "--name", run)
    assert again.returncode == 8
    assert again.stderr == (
        f"lenslab: error: run {run} is already running on box {box}; follow it with "
        f"`lenslab logs {run} -f`, stop it with `lenslab stop {run}`, or pick another --name\n"
    )
    listed = lenslab("runs", "--json")
    assert listed.returncode == 0, listed.stderr
    (entry,) = json.loads(listed.stdout)["runs"]
    assert entry["name"] == run and entry["state"] in ("starting", "running")
    assert entry["container"]["state"] == "running" and entry["container"]["restarts"] == 0

    wait_for("a first checkpoint", lambda: read_status(root, run).get("last_checkpoint"), timeout=600)
    stopped = lenslab("stop", run, timeout=300)
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.startswith(f"run {run} stopped with a checkpoint")
    assert read_status(root, run)["state"] == "interrupted"
    assert supervisor(root, run)["desired"] == "stopped"
    table = lenslab("runs")
    assert table.returncode == 0 and "interrupted" in table.stdout.splitlines()[1], table.stdout

    resumed = lenslab("train", str(run_file), "--name", run, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from step" in resumed.stdout or "it had finished already" in resumed.stdout

    _follow_across_a_dropped_link(cbox["instance"], root, run)
    assert read_status(root, run)["state"] == "finished"

    status = lenslab("status", "--json")
    assert status.returncode == 0, status.stderr
    facts = json.loads(status.stdout)
    assert facts["reachable"] is True and facts["root"] == "/lab" and facts["containers"] == 0

    assert reference.wait(timeout=600) == 0, reference.stderr.read() if reference.stderr else ""
    pulled = lenslab("pull", run, timeout=300)
    assert pulled.returncode == 0, pulled.stderr
    _assert_same_sae(project / "runs" / run / "final", tmp_path / "ref" / "tiny" / "final")
    down = lenslab("down")
    assert down.returncode == 0, down.stderr
    config = Path.home() / ".ssh" / "lenslab" / "config"
    assert not config.exists() or f"lenslab-{box}" not in config.read_text()


def test_a_crash_and_a_restarted_container_continue_the_run(cbox: dict[str, Any]) -> None:
    root, project = Path(cbox["root"]), Path(cbox["project"])
    instance: ContainerBox = cbox["instance"]
    run = unique("cc")
    run_file = tiny_run(project / "run", training_tokens=600_000, checkpoint_every_tokens=40_000)
    assert lenslab("up", timeout=300).returncode == 0
    started = lenslab("train", str(run_file), "--name", run, timeout=600)
    assert started.returncode == 0, started.stderr

    # A crash (what the OOM killer does): the supervisor restarts the trainer and it resumes.
    wait_for("a first checkpoint", lambda: read_status(root, run).get("last_checkpoint"), timeout=600)
    trainer = supervisor(root, run)["trainer_pid"]
    assert instance.exec(f"kill -9 {trainer}").returncode == 0
    wait_for("the restart", lambda: supervisor(root, run).get("restarts") == 1, timeout=120)
    log = root / "runs" / run / "train.log"
    wait_for("the resume", lambda: "resuming from step-" in log.read_text(), timeout=600)
    listed = json.loads(lenslab("runs", "--json").stdout)["runs"][0]
    assert listed["container"]["restarts"] == 1 and listed["state"].startswith("running")

    # The container restarts (the provider restarted the instance): SIGTERM first, so the
    # trainer checkpoints; the new start continues the run that was meant to run.
    instance.restart()
    write_config(project, str(cbox["box"]), instance.port)
    wait_for("the resume after the restart", lambda: log.read_text().count("resuming from step-") >= 2, timeout=600)
    assert "stopped by SIGTERM; checkpoint" in (root / "runs" / run / "console.log").read_text()
    listed = json.loads(lenslab("runs", "--json").stdout)["runs"][0]
    assert listed["container"]["state"] == "running", listed

    _jupyter_answers_through_the_tunnel()

    # `down` stops the run gracefully (it checkpoints) and leaves the data.
    down = lenslab("down", "--json", timeout=300)
    assert down.returncode == 0, down.stderr
    assert json.loads(down.stdout)["stopped"] == [run]
    assert read_status(root, run)["state"] == "interrupted"
    assert supervisor(root, run)["desired"] == "stopped"


def _follow_across_a_dropped_link(instance: ContainerBox, root: Path, run: str) -> None:
    """`logs -f` while the box drops every SSH session: it reconnects, and what it printed is
    the run's log exactly (nothing twice, nothing skipped), to the run's end."""
    with subprocess.Popen([LENSLAB, "logs", run, "-f"], stdout=subprocess.PIPE, stderr=subprocess.PIPE) as logs:
        assert logs.stdout is not None and logs.stderr is not None
        out: list[bytes] = []
        reader = threading.Thread(target=lambda: out.extend(iter(logs.stdout.readline, b"")), daemon=True)  # type: ignore[union-attr]
        reader.start()
        wait_for("log lines", lambda: len(out) > 3, timeout=180)
        assert instance.exec("pkill -f 'sshd: lab@'").returncode == 0
        try:
            code = logs.wait(timeout=900)
        except subprocess.TimeoutExpired:
            logs.kill()
            raise AssertionError(f"`logs -f` did not end: {logs.stderr.read().decode()[-2000:]}") from None
        reader.join(timeout=5)
        err = logs.stderr.read().decode()
    assert code == 0, err
    assert "lost the link to the box" in err and "reconnecting" in err
    printed = b"".join(out)
    assert printed == (root / "runs" / run / "console.log").read_bytes()
    assert b"resuming from step-" in printed and b"finished" in printed.splitlines()[-1]


def _jupyter_answers_through_the_tunnel() -> None:
    port = free_port()
    with subprocess.Popen([LENSLAB, "jupyter", "--port", str(port)], stdout=subprocess.PIPE, text=True) as tunnel:
        try:
            assert tunnel.stdout is not None
            timer = threading.Timer(120, tunnel.kill)  # a hang must fail the test, not stall it
            timer.start()
            url = tunnel.stdout.readline().strip()
            timer.cancel()
            assert url.startswith(f"http://127.0.0.1:{port}/lab?token=")
            token = url.split("token=", 1)[1]
            answer = wait_for("Jupyter to answer", lambda: _api_status(port, token), timeout=180, interval=0.5)
            assert "started" in answer
        finally:
            tunnel.terminate()


def _api_status(port: int, token: str) -> dict[str, object] | None:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/status", headers={"Authorization": f"token {token}"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            data: dict[str, object] = json.loads(response.read())
            return data
    except OSError:
        return None


def _assert_same_sae(pulled: Path, reference: Path) -> None:
    import torch
    from sae_lens import SAE

    got = SAE.load_from_disk(str(pulled), device="cpu")
    want = SAE.load_from_disk(str(reference), device="cpu")
    for key, value in want.state_dict().items():
        assert torch.equal(got.state_dict()[key], value), key
