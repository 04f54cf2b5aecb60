"""Training on a real Slurm cluster (tests/support/slurm_cluster.py) through the real CLI.

A sweep is one job array; a compute node killed mid-run, ``scontrol requeue`` and the time-limit
warning each end with the same run resumed from its checkpoint, and its final SAE is
``torch.equal`` to one trained without interruption (here, on the test host); ``lenslab stop``
and ``scancel`` stop a task for good. The runs are tiny: the cluster shares two cores.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lenslab.contract import EXIT_INTERRUPTED
from tests.support.slurm_cluster import LENSLAB, SlurmCluster, lenslab

pytestmark = [pytest.mark.slow, pytest.mark.docker]

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "workspace" / "configs" / "tiny.toml"
TOKENS, EVERY = 300_000, 16_000  # long enough to be caught mid-run on an idle machine too


def run_files(dest: Path, names: list[str], tokens: int = TOKENS, every: int = EVERY) -> list[Path]:
    """tiny.toml, shortened, once per name, with its dataset beside them (uploaded with each)."""
    text = TINY.read_text()
    text = re.sub(r"^training_tokens = .*$", f"training_tokens = {tokens}", text, flags=re.M)
    text = text.replace("[resilience]\n", f"[resilience]\ncheckpoint_every_tokens = {every}\n")
    text = re.sub(r"^checkpoint_every_seconds = .*$", "checkpoint_every_seconds = 3600", text, flags=re.M)
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(TINY.parent / "data", dest / "data", dirs_exist_ok=True)
    paths = []
    for name in names:
        path = dest / f"{name}.toml"
        path.write_text(re.sub(r"^name = .*$", f'name = "{name}"', text, count=1, flags=re.M))
        paths.append(path)
    return paths


def wait_for(
    what: str, check: Callable[[], Any], timeout: float, interval: float = 0.5, seen: Callable[[], Any] = str
) -> Any:
    """``check()`` once it is true; on timeout, what ``seen()`` says of the state reached."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; seen: {seen()}")


def shared(cluster: SlurmCluster) -> Path:
    """The persistent root as the test host sees it."""
    return cluster.host_shared / Path(cluster.shared_root).relative_to("/shared")


def status(cluster: SlurmCluster, name: str) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads((shared(cluster) / "runs" / name / "status.json").read_text())
        return data
    except (OSError, ValueError):
        return {}


def events(cluster: SlurmCluster, name: str) -> list[list[str]]:
    """The batch script's record of the run: ["start", job, node, restart] / ["exit", code, why]."""
    path = shared(cluster) / "runs-config" / name / "task-events"
    return [line.split(" ")[1:] for line in path.read_text().splitlines()] if path.exists() else []


def listed(project: Path) -> dict[str, dict[str, Any]]:
    """`lenslab runs --json`: run name -> status with its ``slurm`` facts."""
    out = lenslab(project, "runs", "--json", timeout=60)
    assert out.returncode == 0, out.stderr
    return {run["name"]: run for run in json.loads(out.stdout)["runs"]}


def checkpointed(cluster: SlurmCluster, name: str) -> bool:
    now = status(cluster, name)
    return now.get("state") == "running" and bool(now.get("last_checkpoint"))


def train(project: Path, *files: Path) -> dict[str, Any]:
    out = lenslab(project, "train", *map(str, files), "--json", timeout=300)
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def assert_same_final(pulled: Path, reference: Path) -> None:
    import torch
    from safetensors.torch import load_file

    weights = sorted(p.name for p in reference.glob("*.safetensors"))
    assert weights and weights == sorted(p.name for p in pulled.glob("*.safetensors"))
    for name in weights:
        got, want = load_file(str(pulled / name)), load_file(str(reference / name))
        assert sorted(got) == sorted(want), name
        for key, value in want.items():
            assert torch.equal(got[key], value), f"{name}: {key}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], Path]]:
    """The tiny run trained without interruption on this host (started once, at first use);
    calling it waits for it and gives its final directory."""
    tmp = tmp_path_factory.mktemp("reference")
    (run_file,) = run_files(tmp / "run", ["ref"])
    trainer = str(Path(sys.executable).with_name("lenslab-train"))
    proc = subprocess.Popen([trainer, str(run_file), "--runs-dir", str(tmp / "runs")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip

    def final() -> Path:
        assert proc.wait(timeout=900) == 0, proc.stderr.read() if proc.stderr else ""
        return tmp / "runs" / "ref" / "final"

    try:
        yield final
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_sweep_is_one_array_and_every_task_is_listed(slurm_project: Path, slurm_cluster: SlurmCluster) -> None:
    names = [f"a{i}" for i in range(4)]
    started = train(slurm_project, *run_files(slurm_project / "sweep", names, tokens=40_000, every=20_000))
    tasks = [run["container"] for run in started["runs"]]
    arrays = {re.fullmatch(r"Slurm job ([0-9]+)_([0-9]+)", task)[1] for task in tasks}  # type: ignore[index]
    assert len(arrays) == 1 and [task.rsplit("_", 1)[1] for task in tasks] == ["0", "1", "2", "3"]
    seen = listed(slurm_project)
    assert [seen[name]["scheduler"]["task"] for name in names] == [task.split()[-1] for task in tasks]
    assert all(seen[name]["scheduler"]["shown"] for name in names)
    wait_for("all four to finish", lambda: all(status(slurm_cluster, n).get("state") == "finished" for n in names),
             timeout=600, interval=2)  # fmt: skip
    seen = wait_for("the tasks to end", lambda: (s := listed(slurm_project)) and all(
        s[n]["scheduler"]["shown"] == "finished" for n in names) and s, timeout=60, interval=1)  # fmt: skip
    assert {seen[n]["scheduler"]["queue"] for n in names} <= {"COMPLETED", None}
    table = lenslab(slurm_project, "runs")
    assert table.returncode == 0 and all(re.search(rf"^{n}\s+finished", table.stdout, re.M) for n in names)
    log = lenslab(slurm_project, "logs", "a2")
    assert log.returncode == 0 and "lenslab-train" in log.stdout, log.stderr
    pulled = lenslab(slurm_project, "pull", "a2", timeout=120)
    assert pulled.returncode == 0, pulled.stderr
    assert list((slurm_project / "runs" / "a2" / "final").glob("*.safetensors"))


def test_a_lost_node_requeues_the_task_elsewhere_and_it_resumes_exactly(
    slurm_project: Path, slurm_cluster: SlurmCluster, reference: Callable[[], Path]
) -> None:
    (run_file,) = run_files(slurm_project / "run", ["lost"])
    train(slurm_project, run_file)
    wait_for("a checkpoint", lambda: checkpointed(slurm_cluster, "lost"), timeout=300, interval=0.2)
    node = events(slurm_cluster, "lost")[-1][2]
    slurm_cluster.kill_node(node)
    try:

        def moved_away() -> dict[str, Any] | None:
            task: dict[str, Any] = listed(slurm_project)["lost"]["scheduler"]
            return task if task["queue"] == "RUNNING" and task["node"] not in (None, node) else None

        moved = wait_for("the task running on the other node", moved_away, timeout=300, interval=1)
        assert moved["restarts"] >= 1 and "requeued 1x" in moved["shown"]
        wait_for("the run to finish", lambda: status(slurm_cluster, "lost").get("state") == "finished",
                 timeout=600, interval=2)  # fmt: skip
    finally:
        slurm_cluster.start_node(node)
    starts = [e for e in events(slurm_cluster, "lost") if e[0] == "start"]
    assert [s[2] for s in starts][:1] == [node] and starts[-1][2] != node and starts[-1][3] == "1"
    assert status(slurm_cluster, "lost").get("resumed_from_step")
    pulled = lenslab(slurm_project, "pull", "lost", timeout=120)
    assert pulled.returncode == 0, pulled.stderr
    assert_same_final(slurm_project / "runs" / "lost" / "final", reference())
    slurm_cluster.wait_idle(120)


def test_scontrol_requeue_checkpoints_and_the_task_resumes_exactly(
    slurm_project: Path, slurm_cluster: SlurmCluster, reference: Callable[[], Path]
) -> None:
    (run_file,) = run_files(slurm_project / "run", ["req"])
    train(slurm_project, run_file)
    wait_for("a checkpoint", lambda: checkpointed(slurm_cluster, "req"), timeout=300, interval=0.2)
    task = listed(slurm_project)["req"]["scheduler"]["task"]
    asked = slurm_cluster.exec("ctl", ["scontrol", "requeue", task], user=slurm_cluster.user)
    assert asked.returncode == 0, asked.stderr
    wait_for("the trainer's graceful exit", lambda: ["exit", str(EXIT_INTERRUPTED), "ended"] in events(
        slurm_cluster, "req"), timeout=60, seen=lambda: events(slurm_cluster, "req"))  # fmt: skip
    wait_for("the run to finish", lambda: status(slurm_cluster, "req").get("state") == "finished",
             timeout=600, interval=2)  # fmt: skip
    # The batch script writes its record once the trainer has exited, just after its last status.
    record = wait_for("the task's end", lambda: (e := events(slurm_cluster, "req")) and e[-1][0] == "exit" and e, 60)
    assert [e[0] for e in record] == ["start", "exit", "start", "exit"] and record[2][3] == "1", record
    assert status(slurm_cluster, "req").get("resumed_from_step")
    pulled = lenslab(slurm_project, "pull", "req", timeout=120)
    assert pulled.returncode == 0, pulled.stderr
    assert_same_final(slurm_project / "runs" / "req" / "final", reference())


def test_stop_and_scancel_end_a_task_for_good_and_train_continues_it(
    slurm_project: Path, slurm_cluster: SlurmCluster
) -> None:
    files = run_files(slurm_project / "run", ["st", "sc"], tokens=2_000_000)
    train(slurm_project, *files)
    wait_for("checkpoints", lambda: checkpointed(slurm_cluster, "st") and checkpointed(slurm_cluster, "sc"), 300)
    follower = subprocess.Popen([LENSLAB, "logs", "st", "-f"], cwd=slurm_project, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip
    stopped = lenslab(slurm_project, "stop", "st", "--json", timeout=300)
    assert stopped.returncode == 0, stopped.stderr
    assert json.loads(stopped.stdout)["exit_code"] == EXIT_INTERRUPTED
    followed, _ = follower.communicate(timeout=60)  # `logs -f` ends by itself when the task leaves the queue
    assert follower.returncode == 0 and "SIGTERM received" in followed, followed[-2000:]
    task = listed(slurm_project)["sc"]["scheduler"]["task"]
    assert slurm_cluster.exec("ctl", ["scancel", task], user=slurm_cluster.user).returncode == 0
    wait_for("sc's graceful exit", lambda: ["exit", str(EXIT_INTERRUPTED), "ended"] in events(slurm_cluster, "sc"),
             timeout=60)  # fmt: skip
    time.sleep(15)  # longer than Slurm takes to requeue anything (SlurmdTimeout, the scheduler's interval)
    seen = listed(slurm_project)
    assert (seen["st"]["scheduler"]["shown"], seen["sc"]["scheduler"]["shown"]) == ("stopped", "cancelled")
    assert [e[0] for e in events(slurm_cluster, "st")] == ["start", "exit"]
    assert [e[0] for e in events(slurm_cluster, "sc")] == ["start", "exit"]
    assert status(slurm_cluster, "st")["state"] == "interrupted"
    gone = lenslab(slurm_project, "stop", "sc")
    assert gone.returncode != 0 and "not running" in gone.stderr
    again = lenslab(slurm_project, "train", str(files[0]), timeout=300)
    assert again.returncode == 0, again.stderr
    wait_for("st resumed", lambda: status(slurm_cluster, "st").get("resumed_from_step"), timeout=300)
    assert lenslab(slurm_project, "stop", "st", timeout=300).returncode == 0


def test_the_time_limit_warning_checkpoints_and_requeues(slurm_project: Path, slurm_cluster: SlurmCluster) -> None:
    """Slurm's warning before the time limit (USR1 to the batch shell, sent here at once)."""
    (run_file,) = run_files(slurm_project / "run", ["lim"], tokens=2_000_000)
    train(slurm_project, run_file)
    wait_for("a checkpoint", lambda: checkpointed(slurm_cluster, "lim"), timeout=300, interval=0.2)
    task = listed(slurm_project)["lim"]["scheduler"]["task"]
    warned = slurm_cluster.exec("ctl", ["scancel", "--batch", "--signal=USR1", task], user=slurm_cluster.user)
    assert warned.returncode == 0, warned.stderr
    wait_for("the task requeued and running again", lambda: [e[0] for e in events(slurm_cluster, "lim")] == [
        "start", "exit", "start"], timeout=300, interval=1)  # fmt: skip
    assert events(slurm_cluster, "lim")[1] == ["exit", str(EXIT_INTERRUPTED), "requeue"]
    wait_for("lim resumed", lambda: status(slurm_cluster, "lim").get("resumed_from_step"), timeout=300)
    assert listed(slurm_project)["lim"]["scheduler"]["restarts"] == 1
    assert lenslab(slurm_project, "stop", "lim", timeout=300).returncode == 0
