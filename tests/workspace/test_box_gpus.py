"""One run per GPU on a box: the GPU inventory read from nvidia-smi, and the placement and
queue every run goes through (``lenslab-box place`` in a training container, the supervisor
on a box without Docker).

No GPU exists on the machines that run these tests. The inventory's parser is tested on lines
in NVIDIA's documented CSV format (``nvidia-smi --query-gpu=... --format=csv,noheader,nounits``:
one line per GPU, fields separated by ", "); placement is tested with a stand-in `nvidia-smi`
executable on PATH that prints such lines for two GPUs, in place of the driver's own tool.
Everything else is real: `lenslab-box`, its file locks on the root, signals, processes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lenslab_workspace.box.gpus import Gpu, inventory, parse
from tests.workspace.test_box_supervisor import BOX, box, running, supervisor, wait_for

UUID0 = "GPU-5f3c1e2a-1b2c-3d4e-5f60-718293a4b5c6"
UUID1 = "GPU-0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9"
INDEX = {UUID0: 0, UUID1: 1}
TWO_GPUS = [f"0, {UUID0}, NVIDIA H100 80GB HBM3, 81559", f"1, {UUID1}, NVIDIA H100 80GB HBM3, 81559"]


def stand_in_smi(bin_dir: Path, lines: list[str], exit_code: int = 0) -> dict[str, str]:
    """An environment whose PATH has a stand-in for NVIDIA's driver tool `nvidia-smi` (no GPU
    exists here): it answers lenslab-box's one query with ``lines`` and refuses anything else."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    (bin_dir / "smi-answer").write_text("".join(f"{line}\n" for line in lines))
    script = bin_dir / "nvidia-smi"
    script.write_text(
        "#!/bin/sh\n# Stands in for the NVIDIA driver's nvidia-smi: these machines have no GPU.\n"
        'if [ "$1" = "--query-gpu=index,uuid,name,memory.total" ] && [ "$2" = "--format=csv,noheader,nounits" ]; '
        f"then /bin/cat {bin_dir / 'smi-answer'}; exit {exit_code}; fi\n"
        'echo "nvidia-smi stand-in: unexpected arguments: $*" >&2; exit 2\n'
    )
    script.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}"}


def test_the_parser_reads_nvidias_csv_lines() -> None:
    text = "\n".join([*TWO_GPUS, "2, GPU-11111111-2222-3333-4444-555555555555, Tesla V100-SXM2-16GB, 16160"])
    assert parse(text + "\n") == [
        Gpu(0, UUID0, "NVIDIA H100 80GB HBM3", 81559),
        Gpu(1, UUID1, "NVIDIA H100 80GB HBM3", 81559),
        Gpu(2, "GPU-11111111-2222-3333-4444-555555555555", "Tesla V100-SXM2-16GB", 16160),
    ]
    # The driver reports no memory for some boards; a name may hold a comma; order is by index.
    odd = [f"1, {UUID1}, NVIDIA GH200 480GB, [N/A]", f"0, {UUID0}, Board, rev 2, 40960"]
    assert parse("\n".join(odd)) == [Gpu(0, UUID0, "Board, rev 2", 40960), Gpu(1, UUID1, "NVIDIA GH200 480GB", None)]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "No devices were found",
        "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. Make sure that the "
        "latest NVIDIA driver is installed and running.",
        "index, uuid, name, memory.total [MiB]",  # the header, had noheader been left out
        f"x, {UUID0}, NVIDIA H100, 81559",
        "0, MIG-5f3c1e2a-1b2c-3d4e-5f60-718293a4b5c6, NVIDIA H100, 81559",
        "0, GPU-not-a-uuid, NVIDIA H100, 81559",
        f"64, {UUID0}, NVIDIA H100, 81559",
        f"0, {UUID0}, NVIDIA\x1b[2J H100, 81559",
        f"0, {UUID0}, , 81559",
        f"0, {UUID0}, 81559",
    ],
    ids=["empty", "no-devices", "no-driver", "header", "index", "mig", "uuid", "too-many", "escape", "noname", "short"],
)
def test_a_line_that_is_not_one_gpu_is_skipped(text: str) -> None:
    assert parse(text) == []


def test_a_repeated_index_or_uuid_is_one_gpu() -> None:
    lines = [TWO_GPUS[0], f"0, {UUID1}, Other, 1", f"3, {UUID0}, Other, 1", TWO_GPUS[1]]
    assert [g.index for g in parse("\n".join(lines))] == [0, 1]


def test_no_tool_a_failing_tool_or_a_hanging_tool_is_no_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert inventory() == []
    env = stand_in_smi(tmp_path / "bin", TWO_GPUS)
    monkeypatch.setenv("PATH", env["PATH"])
    assert [g.uuid for g in inventory()] == [UUID0, UUID1]
    stand_in_smi(tmp_path / "bin", TWO_GPUS, exit_code=9)  # the driver is not loaded
    assert inventory() == []
    (tmp_path / "bin" / "nvidia-smi").write_text("#!/bin/sh\nsleep 30\n")
    assert inventory(timeout=0.5) == []


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "root"


@pytest.fixture(autouse=True)
def stop_leftovers(root: Path, tmp_path: Path) -> Any:
    yield
    for path in (root / "runs").glob("*/supervisor.json"):
        subprocess.run([BOX, "--root", str(root), "stop", path.parent.name], capture_output=True, timeout=200,
                       check=False)  # fmt: skip
    # Whatever a failed test left behind: only processes whose command line names its directory.
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if str(tmp_path).encode() in (proc / "cmdline").read_bytes():
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ValueError):
            pass


def gpu_record(root: Path, run: str) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads((root / "runs" / run / "gpu.json").read_text())
        return data
    except (OSError, ValueError):
        return {}


def environ(pid: int) -> dict[str, str]:
    """What process ``pid`` was started with (or exec'd into), as the kernel keeps it."""
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def queue_entries(root: Path) -> list[str]:
    where = root / ".lenslab" / "gpu-queue"
    return sorted(p.name.split("-", 1)[1] for p in where.iterdir() if not p.name.startswith("."))


def job(tmp_path: Path) -> Path:
    """A stand-in trainer: records the GPU it was given, runs until ``<arg>.done`` exists."""
    script = tmp_path / "job.sh"
    script.write_text('#!/bin/sh\necho "$CUDA_VISIBLE_DEVICES" > "$1.gpu"\ntrap \'exit 75\' TERM\n'
                      'while [ ! -f "$1.done" ]; do sleep 0.1; done\n')  # fmt: skip
    script.chmod(0o755)
    return script


@pytest.mark.slow  # waits out real timeouts or processes: seconds
def test_place_gives_each_command_its_own_gpu_and_queues_the_rest_in_order(root: Path, tmp_path: Path) -> None:
    """A training container's command on a box with an engine: ``lenslab-box place``."""
    env = stand_in_smi(tmp_path / "bin", TWO_GPUS)
    script, out = job(tmp_path), tmp_path / "out"
    out.mkdir()

    def place(run: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen([BOX, "--root", str(root), "place", run, "--", str(script), str(out / run)], env=env)

    procs = {"a": place("a")}
    wait_for("a on a GPU", lambda: (out / "a.gpu").is_file(), timeout=20)
    procs["b"] = place("b")
    wait_for("b on a GPU", lambda: (out / "b.gpu").is_file(), timeout=20)
    given = {run: (out / f"{run}.gpu").read_text().strip() for run in ("a", "b")}
    assert set(given.values()) == {UUID0, UUID1}
    # The command is the placer's own process (exec), so it is the container's first process.
    assert environ(procs["a"].pid)["CUDA_VISIBLE_DEVICES"] == given["a"]
    record = gpu_record(root, "a")
    assert (record["state"], record["uuid"], record["index"]) == ("placed", given["a"], INDEX[given["a"]])

    procs["c"] = place("c")
    wait_for("c queued", lambda: gpu_record(root, "c").get("state") == "queued", timeout=20)
    procs["d"] = place("d")
    wait_for("d queued", lambda: gpu_record(root, "d").get("state") == "queued", timeout=20)
    assert queue_entries(root) == ["c", "d"] and not (out / "c.gpu").exists()

    (out / "a.done").touch()  # a finishes: the oldest waiter, c, gets its GPU
    assert procs["a"].wait(timeout=20) == 0
    wait_for("c on a's GPU", lambda: (out / "c.gpu").is_file(), timeout=20)
    assert (out / "c.gpu").read_text().strip() == given["a"]
    assert gpu_record(root, "d")["state"] == "queued" and queue_entries(root) == ["d"]

    procs["d"].send_signal(signal.SIGTERM)  # `lenslab stop` of a queued run: it leaves the queue
    assert procs["d"].wait(timeout=20) == 75
    assert queue_entries(root) == [] and gpu_record(root, "d") == {} and not (out / "d.gpu").exists()

    procs["b"].kill()  # a run killed outright frees its GPU too (the kernel drops its lock)
    procs["b"].wait(timeout=20)
    procs["e"] = place("e")
    wait_for("e on b's GPU", lambda: (out / "e.gpu").is_file(), timeout=20)
    assert (out / "e.gpu").read_text().strip() == given["b"]
    for run in ("c", "e"):
        (out / f"{run}.done").touch()
        assert procs[run].wait(timeout=20) == 0


def test_place_without_gpus_runs_the_command_as_before(root: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PATH": f"{tmp_path / 'none'}:/usr/bin:/bin"}
    done = subprocess.run([BOX, "--root", str(root), "place", "r", "--", "sh", "-c", 'echo "[$CUDA_VISIBLE_DEVICES]"'],
                          capture_output=True, text=True, env=env, timeout=30, check=False)  # fmt: skip
    assert (done.returncode, done.stdout) == (0, "[]\n"), done.stderr
    assert not (root / ".lenslab" / "gpus").exists() and gpu_record(root, "r") == {}
    bad = box(root, "place", "../x", "--", "true")
    assert bad.returncode == 2 and bad.stdout == "" and bad.stderr.count("\n") == 1
    assert bad.stderr.startswith("lenslab-box: error: usage: lenslab-box place NAME -- COMMAND")


def fake_trainer(tmp_path: Path, name: str) -> Path:
    """A run file, and a `lenslab-train` on PATH that records its GPU and runs until
    ``<name>.done`` exists (then exits 0: the run finished)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "lenslab-train"
    script.write_text(f'#!/bin/sh\nn=$(basename "$1" .toml)\necho "$CUDA_VISIBLE_DEVICES" >> {tmp_path}/$n.gpu\n'
                      f"trap 'exit 75' TERM\nwhile [ ! -f {tmp_path}/$n.done ]; do sleep 0.1; done\n")  # fmt: skip
    script.chmod(0o755)
    run_file = tmp_path / f"{name}.toml"
    run_file.write_text(f'name = "{name}"\n')
    return run_file


def listed(root: Path, env: dict[str, str]) -> dict[str, dict[str, Any]]:
    out = box(root, "runs", "--json", env=env)
    assert out.returncode == 0, out.stderr
    return {entry["name"]: entry for entry in json.loads(out.stdout)}


@pytest.mark.slow  # real processes, seconds each: kept out of the fast lane
def test_supervised_runs_take_one_gpu_each_and_the_queue_starts_the_next(root: Path, tmp_path: Path) -> None:
    """A box without Docker: the supervisor places its run; a queued run is started by its own
    supervisor when a GPU frees; `lenslab-box runs` says which GPU each run has."""
    env = stand_in_smi(tmp_path / "bin", TWO_GPUS)
    for run in ("g1", "g2", "g3", "g4"):
        started = box(root, "start", run, str(fake_trainer(tmp_path, run)), env=env)
        assert started.returncode == 0, started.stderr
        if run in ("g1", "g2"):
            wait_for(f"{run}'s trainer", lambda: supervisor(root, run).get("phase") == "running", timeout=20)  # noqa: B023
    wait_for("g3 and g4 queued", lambda: all(supervisor(root, r).get("phase") == "queued" for r in ("g3", "g4")),
             timeout=20)  # fmt: skip
    trainers = {run: supervisor(root, run)["trainer_pid"] for run in ("g1", "g2")}
    seen = {run: environ(pid)["CUDA_VISIBLE_DEVICES"] for run, pid in trainers.items()}
    assert set(seen.values()) == {UUID0, UUID1}
    entries = listed(root, env)
    assert {run: entries[run]["gpu"]["state"] for run in entries} == {
        "g1": "placed", "g2": "placed", "g3": "queued", "g4": "queued",
    }  # fmt: skip
    assert (entries["g1"]["gpu"]["uuid"], entries["g1"]["gpu"]["index"]) == (seen["g1"], INDEX[seen["g1"]])

    stopped = box(root, "stop", "g4", env=env)  # a queued run stopped: gone from the queue
    assert json.loads(stopped.stdout) == {"run": "g4", "was_running": True, "exit_code": 75, "queued": True}
    assert queue_entries(root) == ["g3"] and listed(root, env)["g4"]["gpu"] is None
    assert supervisor(root, "g4")["desired"] == "stopped" and not (tmp_path / "g4.gpu").exists()

    (tmp_path / "g1.done").touch()  # g1 finishes: g3 starts on its GPU
    wait_for("g3's trainer", lambda: supervisor(root, "g3").get("phase") == "running", timeout=30)
    g3 = supervisor(root, "g3")["trainer_pid"]
    assert environ(g3)["CUDA_VISIBLE_DEVICES"] == seen["g1"]
    assert not running(trainers["g1"]) and listed(root, env)["g1"]["gpu"] is None
    assert "queued: all 2 GPU(s) are in use" in (root / "runs" / "g3" / "console.log").read_text()

    box(root, "stop", "g2", env=env)  # a stopped run frees its GPU too
    (tmp_path / "g5.done").touch()
    assert box(root, "start", "g5", str(fake_trainer(tmp_path, "g5")), env=env).returncode == 0
    wait_for("g5 on g2's GPU", lambda: (tmp_path / "g5.gpu").is_file(), timeout=20)
    assert (tmp_path / "g5.gpu").read_text().split() == [seen["g2"]]


def test_a_restarted_box_starts_the_runs_that_had_a_gpu_first_then_the_queue_in_order() -> None:
    from lenslab_workspace.box.placement import resume_key

    states: dict[str, dict[str, object]] = {
        "q2": {"queued_at": 20.0}, "had": {"queued_at": None}, "q1": {"queued_at": 10}, "odd": {"queued_at": True},
    }  # fmt: skip
    assert sorted(states, key=lambda name: resume_key(states[name])) == ["had", "odd", "q1", "q2"]
