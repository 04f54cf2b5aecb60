"""`lenslab-box`'s supervisor on this machine, without SSH: real `lenslab-train` processes,
real signals, the real run directory.

A run is started detached and supervised; a second start is refused; a graceful stop leaves
a checkpoint and exit 75; a kill -9 of the trainer is a crash the supervisor restarts (and the
trainer resumes); the sixth crash in a row is not restarted.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "workspace" / "configs" / "tiny.toml"
BOX = str(Path(sys.executable).with_name("lenslab-box"))


def tiny_run(dest: Path, name: str, training_tokens: int, checkpoint_every_tokens: int) -> Path:
    text = re.sub(r"^name = .*$", f'name = "{name}"', TINY.read_text(), count=1, flags=re.M)
    text = re.sub(r"^training_tokens = .*$", f"training_tokens = {training_tokens}", text, flags=re.M)
    text = text.replace("[resilience]\n", f"[resilience]\ncheckpoint_every_tokens = {checkpoint_every_tokens}\n")
    text = re.sub(r"^checkpoint_every_seconds = .*$", "checkpoint_every_seconds = 3600", text, flags=re.M)
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(TINY.parent / "data", dest / "data", dirs_exist_ok=True)
    path = dest / "run.toml"
    path.write_text(text)
    return path


def box(
    root: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 200
) -> subprocess.CompletedProcess[str]:
    return subprocess.run([BOX, "--root", str(root), *args], capture_output=True, text=True, timeout=timeout,
                          env=env, check=False)  # fmt: skip


def wait_for(what: str, check: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def supervisor(root: Path, run: str) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads((root / "runs" / run / "supervisor.json").read_text())
        return data
    except (OSError, ValueError):
        return {}


def status(root: Path, run: str) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads((root / "runs" / run / "status.json").read_text())
        return data
    except (OSError, ValueError):
        return {}


def listed(root: Path, run: str) -> dict[str, Any]:
    out = box(root, "runs", "--json")
    assert out.returncode == 0, out.stderr
    entries = {entry["name"]: entry for entry in json.loads(out.stdout)}
    return dict(entries.get(run) or {})


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "root"


@pytest.fixture(autouse=True)
def stop_leftovers(root: Path, tmp_path: Path) -> Any:
    yield
    for path in (root / "runs").glob("*/supervisor.json"):
        subprocess.run(
            [BOX, "--root", str(root), "stop", path.parent.name], capture_output=True, timeout=200, check=False
        )
    # Whatever a failed test left behind: only processes whose command line names its directory.
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if str(tmp_path).encode() in (proc / "cmdline").read_bytes():
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ValueError):
            pass


@pytest.mark.slow
def test_stop_checkpoints_and_a_new_start_resumes(root: Path, tmp_path: Path) -> None:
    run_file = tiny_run(tmp_path / "cfg", "r1", training_tokens=300_000, checkpoint_every_tokens=40_000)
    started = box(root, "start", "r1", str(run_file))
    assert started.returncode == 0, started.stderr
    pid = json.loads(started.stdout)["supervisor_pid"]
    assert isinstance(pid, int) and supervisor(root, "r1")["desired"] == "running"

    again = box(root, "start", "r1", str(run_file))
    assert (again.returncode, again.stdout) == (8, "")
    assert again.stderr == "lenslab-box: error: run r1 is already running\n"

    wait_for("a first checkpoint", lambda: status(root, "r1").get("last_checkpoint"), timeout=300)
    entry = listed(root, "r1")
    assert entry["supervisor"]["alive"] is True and entry["supervisor"]["restarts"] == 0
    assert entry["status"]["state"] == "running"

    stopped = box(root, "stop", "r1")
    assert stopped.returncode == 0, stopped.stderr
    assert json.loads(stopped.stdout) == {"run": "r1", "was_running": True, "exit_code": 75}
    assert status(root, "r1")["state"] == "interrupted"
    state = supervisor(root, "r1")
    assert state["desired"] == "stopped" and state["last_exit_code"] == 75 and state["restarts"] == 0
    assert listed(root, "r1")["supervisor"]["alive"] is False
    assert json.loads(box(root, "stop", "r1").stdout)["was_running"] is False

    assert box(root, "start", "r1", str(run_file)).returncode == 0
    log = root / "runs" / "r1" / "train.log"
    wait_for("the resume", lambda: "resuming from step-" in log.read_text(), timeout=300)
    console = box(root, "logs", "r1")
    assert console.returncode == 0 and "resuming from step-" in console.stdout


@pytest.mark.slow
def test_a_killed_trainer_is_restarted_and_resumes(root: Path, tmp_path: Path) -> None:
    run_file = tiny_run(tmp_path / "cfg", "r2", training_tokens=300_000, checkpoint_every_tokens=40_000)
    assert box(root, "start", "r2", str(run_file)).returncode == 0
    wait_for("a first checkpoint", lambda: status(root, "r2").get("last_checkpoint"), timeout=300)
    trainer = supervisor(root, "r2")["trainer_pid"]
    os.kill(trainer, signal.SIGKILL)
    wait_for("the restart", lambda: supervisor(root, "r2").get("restarts") == 1, timeout=60)
    log = root / "runs" / "r2" / "train.log"
    wait_for("the resume", lambda: "resuming from step-" in log.read_text(), timeout=300)
    state = supervisor(root, "r2")
    assert state["trainer_pid"] != trainer and state["desired"] == "running"
    assert "trainer crashed (exit 137); restarting it (1/5)" in (root / "runs" / "r2" / "console.log").read_text()


@pytest.mark.slow
def test_the_sixth_crash_in_a_row_is_not_restarted(root: Path, tmp_path: Path) -> None:
    """A trainer that fails every time (exit 1, a failure during training): 5 restarts, then none."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    launches = tmp_path / "launches"
    crashing = bin_dir / "lenslab-train"
    crashing.write_text(f"#!/bin/sh\necho launch >> {launches}\necho 'out of memory' >&2\nexit 1\n")
    crashing.chmod(0o755)
    run_file = tiny_run(tmp_path / "cfg", "r3", training_tokens=20_000, checkpoint_every_tokens=10_000)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    assert box(root, "start", "r3", str(run_file), env=env).returncode == 0
    wait_for("the supervisor to give up", lambda: not listed(root, "r3")["supervisor"]["alive"], timeout=120)
    assert launches.read_text().count("launch") == 6
    state = supervisor(root, "r3")
    assert state["restarts"] == 5 and state["last_exit_code"] == 1 and state["desired"] == "stopped"
    console = (root / "runs" / "r3" / "console.log").read_text()
    assert "trainer crashed (exit 1) after 5 restarts; not restarting it" in console


@pytest.mark.slow  # waits out real timeouts or processes: seconds
def test_a_finished_or_refused_run_is_not_restarted(root: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "r4"\nno_such_field = 1\n')
    assert box(root, "start", "r4", str(bad)).returncode == 0
    wait_for("the supervisor to exit", lambda: supervisor(root, "r4").get("phase") == "exited", timeout=120)
    state = supervisor(root, "r4")
    assert state["last_exit_code"] == 2 and state["restarts"] == 0 and state["desired"] == "stopped"
    assert "lenslab-train: error:" in (root / "runs" / "r4" / "console.log").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["start", "../x", "run.toml"], "lenslab-box: error: run name '../x' is not valid"),
        (["start", "ok", "missing.toml"], "lenslab-box: error: run file missing.toml does not exist"),
        (["stop", "-bad"], "lenslab-box: error: run name '-bad' is not valid"),
        (["logs", "nothing"], "lenslab-box: error: run nothing has no log on this box"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(root: Path, args: list[str], message: str) -> None:
    out = box(root, *([*args[:1], "--", *args[1:]] if args[1].startswith("-") else args))
    assert out.returncode in (2, 3) and out.stdout == ""
    assert out.stderr.startswith(message) and out.stderr.count("\n") == 1, out.stderr
    assert not (root / "runs").exists() or not any((root / "runs").iterdir())


def test_facts_and_version() -> None:
    version = subprocess.run([BOX, "--version"], capture_output=True, text=True, check=True)
    assert re.fullmatch(r"lenslab-box \d+\.\d+\.\d+\n", version.stdout)


def test_prepare_and_facts_have_the_shapes_the_laptop_checks(root: Path) -> None:
    from lenslab.remote.bootstrap import check_status_facts, summary_problem

    prepared = box(root, "prepare", "--json")
    assert prepared.returncode == 0, prepared.stderr
    summary = json.loads(prepared.stdout)
    assert summary_problem(summary) is None and summary["root"] == str(root) and summary["docker"] == "none"
    assert all((root / sub).is_dir() for sub in ("workspace", "checkpoints", "hf-cache", "runs"))
    again = json.loads(box(root, "prepare", "--json").stdout)
    assert again["changed"] == []
    facts = check_status_facts(json.loads(box(root, "facts", "--json").stdout), "lenslab-box facts")
    assert facts["root_exists"] is True and facts["containers"] == 0 and facts["disk_free_kb"] > 0


def fake_trainer(tmp_path: Path, name: str) -> tuple[Path, dict[str, str], Path]:
    """A run file, an env with a `lenslab-train` on PATH that loops until SIGTERM (then exits
    75, as the real one does after its checkpoint), and the file each launch writes its pid to."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    launches = tmp_path / f"launches-{name}"
    script = bin_dir / "lenslab-train"
    script.write_text(f"#!/bin/sh\necho $$ >> {launches}\ntrap 'exit 75' TERM\nwhile :; do sleep 0.1; done\n")
    script.chmod(0o755)
    run_file = tmp_path / f"{name}.toml"
    run_file.write_text(f'name = "{name}"\n')
    return run_file, {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}, launches


def pids(launches: Path) -> list[int]:
    return [int(line) for line in launches.read_text().split()] if launches.is_file() else []


def start_ticks(pid: int) -> int | None:
    """When ``pid`` started (the recorded fact a reused pid does not match); None once gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else int(fields[19])


def running(pid: int) -> bool:
    return start_ticks(pid) is not None


@pytest.mark.slow  # seconds of real processes: outside the fast lane
def test_concurrent_starts_give_one_supervisor_and_one_trainer(root: Path, tmp_path: Path) -> None:
    run_file, env, launches = fake_trainer(tmp_path, "r5")
    starts = [subprocess.Popen([BOX, "--root", str(root), "start", "r5", str(run_file)], env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]  # fmt: skip
    codes = sorted(proc.wait(timeout=60) for proc in starts)
    assert codes == [0, 8], [proc.communicate() for proc in starts]
    wait_for("the trainer", lambda: pids(launches), timeout=20)
    # A supervisor started by hand beside the live one refuses: the run's lock is held.
    second = box(root, "supervise", "r5", str(run_file), env=env, timeout=30)
    assert second.returncode == 8
    time.sleep(1)
    assert len(pids(launches)) == 1
    stopped = box(root, "stop", "r5")
    assert json.loads(stopped.stdout) == {"run": "r5", "was_running": True, "exit_code": 75}
    assert not running(pids(launches)[0])


def test_a_killed_supervisor_takes_its_trainer_along(root: Path, tmp_path: Path) -> None:
    run_file, env, _ = fake_trainer(tmp_path, "r6")
    assert box(root, "start", "r6", str(run_file), env=env).returncode == 0
    trainer = wait_for("the trainer", lambda: supervisor(root, "r6").get("trainer_pid"), timeout=20)
    os.kill(supervisor(root, "r6")["supervisor_pid"], signal.SIGKILL)
    wait_for("the trainer to exit", lambda: not running(trainer), timeout=20)


def test_an_orphaned_trainer_is_stopped_by_stop_and_by_start(root: Path, tmp_path: Path) -> None:
    """A trainer left running by a supervisor that died (no death signal reached it)."""
    run_file, env, launches = fake_trainer(tmp_path, "r6b")

    def orphan() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([str(tmp_path / "bin" / "lenslab-train")])
        wait_for("the orphan", lambda: proc.pid in pids(launches), timeout=10)
        state = {"run": "r6b", "run_file": str(run_file), "desired": "running", "supervisor_pid": None,
                 "trainer_pid": proc.pid, "trainer_start_ticks": start_ticks(proc.pid), "phase": "running"}  # fmt: skip
        (root / "runs" / "r6b").mkdir(parents=True, exist_ok=True)
        (root / "runs" / "r6b" / "supervisor.json").write_text(json.dumps(state))
        return proc

    first = orphan()
    stopped = box(root, "stop", "r6b")
    assert json.loads(stopped.stdout) == {"run": "r6b", "was_running": True, "exit_code": None}
    assert first.wait(timeout=10) == 75

    second = orphan()
    assert box(root, "start", "r6b", str(run_file), env=env).returncode == 0
    assert second.wait(timeout=10) == 75
    wait_for("the new trainer", lambda: len(pids(launches)) == 3, timeout=20)
    assert running(pids(launches)[-1])


@pytest.mark.slow  # seconds of real processes: outside the fast lane
def test_a_stop_while_the_run_starts_stops_it(root: Path, tmp_path: Path) -> None:
    run_file, env, launches = fake_trainer(tmp_path, "r7")
    # The new supervisor takes 2 s to start, so the stop surely comes while the run is starting.
    slow = tmp_path / "slow"
    slow.mkdir()
    (slow / "sitecustomize.py").write_text("import sys, time\nif 'supervise' in sys.argv:\n    time.sleep(2)\n")
    starting = subprocess.Popen([BOX, "--root", str(root), "start", "r7", str(run_file)],
                                env={**env, "PYTHONPATH": str(slow)})  # fmt: skip
    wait_for("phase starting", lambda: supervisor(root, "r7").get("phase") == "starting", timeout=20)
    assert supervisor(root, "r7")["supervisor_pid"] is None
    stopped = box(root, "stop", "r7", timeout=60)
    assert starting.wait(timeout=30) == 0
    assert json.loads(stopped.stdout)["was_running"] is True
    time.sleep(0.5)
    assert all(not running(pid) for pid in pids(launches))
    state = supervisor(root, "r7")
    assert state["desired"] == "stopped" and state["phase"] == "exited"


def test_a_supervisor_launches_nothing_once_the_run_is_stopped(root: Path, tmp_path: Path) -> None:
    run_file, env, launches = fake_trainer(tmp_path, "r7b")
    (root / "runs" / "r7b").mkdir(parents=True)
    (root / "runs" / "r7b" / "supervisor.json").write_text(json.dumps({"run": "r7b", "desired": "stopped"}))
    assert box(root, "supervise", "r7b", str(run_file), env=env, timeout=30).returncode == 0
    assert pids(launches) == [] and supervisor(root, "r7b")["phase"] == "exited"


# Two real ed25519 public keys (their private halves were never kept).
KEY_A = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBhV0x9mMxZ3Yl0cJ4VdQk2N8r0x2a3b4c5d6e7f8g9h"
KEY_B = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKq1w2e3r4t5y6u7i8o9p0a1s2d3f4g5h6j7k8l9z0x1"


def test_odd_lines_of_runpods_public_key_are_skipped_not_fatal(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from lenslab_workspace.box import serve
    from lenslab_workspace.box.layout import BoxError

    monkeypatch.setenv("LENSLAB_PUBLIC_KEY", f"{KEY_A} lenslab")
    odd = ["not a key at all", f'command="true" {KEY_B} opts', f"{KEY_B} bell\x07here"]
    monkeypatch.setenv("PUBLIC_KEY", "\\n".join([f"{KEY_B} José@laptop", *odd, f"{KEY_A} lenslab"]))
    assert serve.public_keys() == [f"{KEY_A} lenslab", f"{KEY_B} José@laptop"]
    warnings = capsys.readouterr().err.splitlines()
    assert warnings == [f"lenslab-box serve: warning: skipped line {n} of PUBLIC_KEY: not an OpenSSH public key line"
                        for n in (2, 3, 4)]  # fmt: skip

    monkeypatch.setenv("LENSLAB_PUBLIC_KEY", "not a key")
    with pytest.raises(BoxError, match=r"^LENSLAB_PUBLIC_KEY holds something that is not") as refused:
        serve.public_keys()
    assert refused.value.exit_code == 2


def test_serve_as_root_refuses_in_one_line_and_writes_nothing(root: Path) -> None:
    as_root = "import os, sys; os.getuid = lambda: 0; from lenslab_workspace.box.cli import main; sys.exit(main())"
    out = subprocess.run([sys.executable, "-c", as_root, "--root", str(root), "serve"], capture_output=True,
                         text=True, timeout=30, check=False, env={**os.environ, "PUBLIC_KEY": KEY_A})  # fmt: skip
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == (
        "lenslab-box: error: serve runs as the image's unprivileged user, not root; set USER in the image\n"
    )
    assert not root.exists()


def test_sshd_that_keeps_exiting_is_restarted_with_a_growing_delay(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from lenslab_workspace.box import serve

    failing = tmp_path / "sshd"
    failing.write_text(f"#!/bin/sh\necho started >> {tmp_path / 'starts'}\nexit 255\n")
    failing.chmod(0o755)
    monkeypatch.setattr(serve, "SSHD", str(failing))
    server = serve.Server(root)
    config = tmp_path / "sshd_config"
    now = 0.0
    server._start_sshd(config, now)
    for expected in (1, 2, 4, 8, 16, 32, 60, 60):
        assert server.sshd is not None
        server.sshd.wait()
        server.keep_sshd(config, now)
        assert capsys.readouterr().err == f"lenslab-box serve: sshd exited (255); starting it again in {expected}s\n"
        first = server.sshd.pid
        server.keep_sshd(config, now + expected - 0.1)  # not yet
        assert server.sshd.pid == first
        now += expected
        server.keep_sshd(config, now)
        assert server.sshd.pid != first
    server.sshd.wait()
    assert (tmp_path / "starts").read_text().count("started") == 9
    # One that ran for a minute was healthy: the next exit waits 1 s again.
    server.keep_sshd(config, now + 61)
    assert capsys.readouterr().err.endswith("starting it again in 1s\n")


RANGE = "pick one from 1024 to 65535"


def test_jupyter_port_out_of_range_is_one_line_and_writes_nothing(root: Path) -> None:
    for port in ("99999", "80", "-1"):
        out = box(root, "jupyter", "--port", port)
        assert out.returncode == 2 and out.stdout == ""
        assert out.stderr == f"lenslab-box: error: --port {port} is not a port Jupyter can use: {RANGE}\n"
    assert not root.exists()


def test_jupyter_does_not_take_a_foreign_listener_for_its_server(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process on the asked port: the new server (a stand-in with the marker in its
    command line) gets a free port, and only a listener that is that process counts."""
    import socket

    from lenslab_workspace.box import facts

    stand_in = tmp_path / "jupyter-stand-in.py"
    stand_in.write_text("import http.server, sys\nhttp.server.test(http.server.BaseHTTPRequestHandler, "
                        "port=int(sys.argv[1]), bind='127.0.0.1')\n")  # fmt: skip
    monkeypatch.setattr(facts, "jupyter_command", lambda root, port: [sys.executable, str(stand_in), str(port)])
    with socket.socket() as foreign:
        foreign.bind(("127.0.0.1", 0))
        foreign.listen()
        taken = foreign.getsockname()[1]
        first = facts.jupyter(root, taken)
        try:
            assert first["started"] is True and first["port"] != taken
            pid = json.loads((root / ".lenslab" / "jupyter.json").read_text())["pid"]
            assert facts.listens(pid, first["port"]) and not facts.listens(pid, taken)
            again = facts.jupyter(root, taken)
            assert again == {**first, "started": False}
            # The record now names the foreign port: that listener is not ours, so a new server starts.
            (root / ".lenslab" / "jupyter.json").write_text(json.dumps({"pid": pid, "port": taken}))
            third = facts.jupyter(root, taken)
            assert third["started"] is True and third["port"] not in (taken, first["port"])
        finally:
            os.kill(pid, signal.SIGKILL)
            third_pid = json.loads((root / ".lenslab" / "jupyter.json").read_text())["pid"]
            os.kill(third_pid, signal.SIGKILL)


def test_a_trainer_that_ignores_sigterm_is_killed_after_the_timeout(tmp_path: Path) -> None:
    from lenslab_workspace.box.layout import stop_process

    stubborn = subprocess.Popen(["/bin/sh", "-c", f"trap '' TERM; echo ready > {tmp_path / 'ready'}; "
                                 "while :; do sleep 0.1; done"])  # fmt: skip
    wait_for("the trap", lambda: (tmp_path / "ready").is_file(), timeout=10)
    ticks = start_ticks(stubborn.pid)
    assert ticks is not None
    began = time.monotonic()
    stop_process(stubborn.pid, ticks, timeout=1.0)
    assert stubborn.wait(timeout=5) == -signal.SIGKILL and time.monotonic() - began >= 1.0
