"""The Slurm lab's own parts, without a cluster: the batch script run by bash with a stand-in
trainer and ``scontrol``, and what the laptop makes of the cluster's answers (hostile ones too)."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from lenslab.contract import EXIT_INTERRUPTED
from lenslab.providers.slurm import jobs
from lenslab.providers.slurm.lab import collect, job_spec

# Stands in for lenslab-train: reports each SIGTERM, checkpoints (exit 75) on the first.
TRAINER = """#!/bin/bash
echo "args $*" >> "$(dirname "$0")/calls"
trap 'echo term >> "$(dirname "$0")/calls"; sleep "${SAVE_SECONDS:-0}"; exit 75' TERM
echo started >> "$(dirname "$0")/calls"
[ -n "${FINISH:-}" ] && exit 0
while :; do sleep 0.1; done
"""
SCONTROL = """#!/bin/bash
echo "scontrol $*" >> "$(dirname "$0")/calls"
[ -z "${SCONTROL_FAILS:-}" ]
"""


def _script(tmp: Path, runs: list[tuple[str, str]]) -> tuple[Path, Path]:
    root = tmp / "root"
    bin_dir = root / ".lenslab/venv/bin"
    bin_dir.mkdir(parents=True)
    for name, body in (("lenslab-train", TRAINER), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    for name, _ in runs:
        (root / "runs-config" / name).mkdir(parents=True)
    script = root / "job.sh"
    script.write_text(jobs.render_script(jobs.JobSpec("b"), str(root), str(bin_dir / "lenslab-train"), runs))
    return root, script


def _start(root: Path, script: Path, task: int, **env: str) -> subprocess.Popen[bytes]:
    environ = {**os.environ, "PATH": f"{root}/.lenslab/venv/bin:{os.environ['PATH']}", "SLURM_ARRAY_TASK_ID":
               str(task), "SLURM_JOB_ID": "41", "SLURM_ARRAY_JOB_ID": "40", "SLURMD_NODENAME": "c1", **env}  # fmt: skip
    return subprocess.Popen(["bash", str(script)], env=environ)


def _calls(root: Path) -> list[str]:
    path = root / ".lenslab/venv/bin/calls"
    return path.read_text().splitlines() if path.exists() else []


def _wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _events(root: Path, name: str) -> list[list[str]]:
    return [line.split(" ")[1:] for line in (root / "runs-config" / name / jobs.EVENTS_FILE).read_text().splitlines()]


def test_script_options_and_syntax(tmp_path: Path) -> None:
    spec = jobs.JobSpec("lab", partition="gpu", account="acct", qos="high", gres="gpu:1", time_limit="1:00:00",
                        signal_lead=90)  # fmt: skip
    text = jobs.render_script(spec, "/shared/my root", "/shared/my root/v/bin/lenslab-train", [("a", "a.toml"),
                              ("b-2", "b 2.toml")])  # fmt: skip
    for option in ("--array=0-1", "--requeue", "--signal=B:USR1@90", "--partition=gpu", "--account=acct",
                   "--qos=high", "--gres=gpu:1", "--time=1:00:00", "--job-name=lenslab-lab"):  # fmt: skip
        assert f"#SBATCH {option}\n" in text
    assert "names=(a b-2)" in text and "files=(a.toml 'b 2.toml')" in text
    (tmp_path / "s.sh").write_text(text)
    assert subprocess.run(["bash", "-n", str(tmp_path / "s.sh")]).returncode == 0
    with pytest.raises(ValueError):
        jobs.render_script(spec, "/r", "/t", [("../evil", "x.toml")])


def test_finished_task_records_its_exit(tmp_path: Path) -> None:
    root, script = _script(tmp_path, [("a", "a.toml"), ("b", "b.toml")])
    proc = _start(root, script, 1, FINISH="1", SLURM_RESTART_COUNT="2")
    assert proc.wait(10) == 0
    assert _events(root, "b") == [["start", "41", "c1", "2"], ["exit", "0", "exit"]]
    assert f"args {root}/runs-config/b/b.toml --runs-dir {root}/runs" in _calls(root)
    assert "started on c1 (restart 2)" in (root / "runs/b/train.log").read_text()
    assert not (root / "runs-config/a" / jobs.EVENTS_FILE).exists()


@pytest.mark.parametrize(
    ("sig", "action", "code", "requeues"),
    [(signal.SIGUSR1, "requeue", 0, True), (signal.SIGUSR2, "stop", 0, False),
     (signal.SIGTERM, "ended", EXIT_INTERRUPTED, False)],
)  # fmt: skip
def test_signals_checkpoint_once_and_requeue_only_before_the_limit(
    tmp_path: Path, sig: signal.Signals, action: str, code: int, requeues: bool
) -> None:
    root, script = _script(tmp_path, [("a", "a.toml")])
    proc = _start(root, script, 0)
    _wait_for(lambda: "started" in _calls(root))
    proc.send_signal(sig)
    if sig == signal.SIGTERM:  # Slurm ends a job by signalling every process of it
        trainer = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        for pid in trainer:
            os.kill(int(pid), signal.SIGTERM)
    assert proc.wait(10) == code
    assert _events(root, "a")[-1] == ["exit", str(EXIT_INTERRUPTED), action]
    calls = _calls(root)
    assert calls.count("term") == 1  # a second SIGTERM would make the trainer exit without its checkpoint
    assert ("scontrol requeue 41" in calls) is requeues


def test_a_stop_during_the_time_limits_checkpoint_sends_no_second_sigterm(tmp_path: Path) -> None:
    root, script = _script(tmp_path, [("a", "a.toml")])
    proc = _start(root, script, 0, SAVE_SECONDS="1")
    _wait_for(lambda: "started" in _calls(root))
    proc.send_signal(signal.SIGUSR1)
    _wait_for(lambda: "term" in _calls(root))
    proc.send_signal(signal.SIGUSR2)  # while the checkpoint is being written
    assert proc.wait(10) == 0
    assert _calls(root).count("term") == 1
    assert _events(root, "a")[-1] == ["exit", str(EXIT_INTERRUPTED), "stop"]
    assert "scontrol requeue 41" not in _calls(root)


def test_a_failed_requeue_ends_the_task_as_interrupted(tmp_path: Path) -> None:
    root, script = _script(tmp_path, [("a", "a.toml")])
    proc = _start(root, script, 0, SCONTROL_FAILS="1")
    _wait_for(lambda: "started" in _calls(root))
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(10) == EXIT_INTERRUPTED
    assert "scontrol requeue 41" in _calls(root)
    assert _events(root, "a")[-1] == ["exit", str(EXIT_INTERRUPTED), "exit"]
    assert "the requeue failed" in (root / "runs/a/train.log").read_text()
    assert jobs.shown_state({"state": "interrupted"}, None, jobs.parse_events(
        (root / "runs-config/a" / jobs.EVENTS_FILE).read_text())) == "interrupted"  # fmt: skip


def test_the_time_limits_warning_before_the_trainer_starts_requeues(tmp_path: Path) -> None:
    root, script = _script(tmp_path, [("a", "a.toml")])
    script.write_text(script.read_text().replace("root=", "kill -USR1 $$\nroot=", 1))
    proc = _start(root, script, 0)
    assert proc.wait(10) == 0
    assert _events(root, "a")[-1] == ["exit", str(EXIT_INTERRUPTED), "requeue"]
    assert "started" not in _calls(root) and "scontrol requeue 41" in _calls(root)


def test_stop_before_the_trainer_starts_starts_nothing(tmp_path: Path) -> None:
    root, script = _script(tmp_path, [("a", "a.toml")])
    # The script's first lines set the traps; a signal that early must not start the trainer.
    text = script.read_text().replace("root=", "kill -USR2 $$\nroot=", 1)
    script.write_text(text)
    proc = _start(root, script, 0)
    assert proc.wait(10) == 0
    assert _events(root, "a")[-1] == ["exit", "0", "stop"]
    assert "started" not in _calls(root)


SCONTROL_OUT = (
    "JobId=101 ArrayJobId=100 ArrayTaskId=1 JobName=lenslab-b UserId=u(1) JobState=RUNNING Reason=None "
    "Dependency=(null) Requeue=1 Restarts=1 BatchFlag=1 ExitCode=0:0 NodeList=c2 Command=/x y/z.sh\n"
    "JobId=100 ArrayJobId=100 ArrayTaskId=0 JobState=COMPLETED Reason=None Restarts=0 ExitCode=0:0 NodeList=c1\n"
    "JobId=102 ArrayJobId=100 ArrayTaskId=2 JobState=CANCELLED Reason=None Restarts=0 ExitCode=0:15 NodeList=c1\n"
    "JobId=100 ArrayJobId=100 ArrayTaskId=3-7%2 JobState=PENDING Reason=JobArrayTaskLimit Restarts=0 "
    "ExitCode=0:0 NodeList=(null)\n"
    "JobId=1x ArrayJobId=100 ArrayTaskId=9 JobState=RUNNING\n"
    "JobId=103 ArrayJobId=100 ArrayTaskId=8 JobState=\x1b[31mEVIL Reason=a\nb Restarts=99999999999 NodeList=$(rm)\n"
)


def test_scontrol_lines_are_checked() -> None:
    parsed = jobs.parse_jobs(SCONTROL_OUT)
    assert [job["job"] for job in parsed] == ["101", "100", "102", "100", "103"]
    assert parsed[0] == {"job": "101", "array": "100", "tasks": {1}, "state": "RUNNING", "reason": None,
                         "restarts": 1, "node": "c2", "exit_code": 0}  # fmt: skip
    assert parsed[3]["tasks"] == {3, 4, 5, 6, 7} and parsed[3]["reason"] == "JobArrayTaskLimit"
    hostile = parsed[4]
    assert hostile["state"] == "UNKNOWN" and hostile["restarts"] == 0 and hostile["node"] is None
    assert jobs.find_task(parsed, "100_5") is parsed[3]
    assert jobs.find_task(parsed, "100_1") is parsed[0]
    assert jobs.find_task(parsed, "100_99") is None and jobs.find_task(parsed, "100_1; rm") is None


@pytest.mark.parametrize(
    ("spec", "tasks"),
    [("0-3", {0, 1, 2, 3}), ("0-6:3", {0, 3, 6}), ("1,4-5%2", {1, 4, 5}), ("5-1", set()), ("0-2:0", set()),
     ("a", set()), ("0-99999999", set()), ("", set())],
)  # fmt: skip
def test_task_lists(spec: str, tasks: set[int]) -> None:
    assert jobs.expand_tasks(spec) == tasks


def test_events_keep_the_last_launch() -> None:
    raw = "10 start 41 c1 0\n20 exit 75 requeue\n30 start 41 c2 1\njunk line\n40 exit x y\n"
    assert jobs.parse_events(raw) == {"started": 30, "node": "c2", "restart": 1, "ended": None, "exit_code": None,
                                      "action": None}  # fmt: skip
    ended = jobs.parse_events(raw + "50 exit 75 weird\n")
    assert (ended["ended"], ended["exit_code"], ended["action"]) == (50, 75, "exit")


def _job(state: str, restarts: int = 0, reason: str | None = None, node: str | None = "c1") -> dict[str, Any]:
    return {"state": state, "restarts": restarts, "reason": reason, "node": node, "exit_code": 1, "tasks": {0}}


@pytest.mark.parametrize(
    ("state", "job", "events", "shown"),
    [
        ("starting", _job("PENDING", reason="Priority"), "", "pending: Priority"),
        ("running", _job("PENDING", 1, "BeginTime"), "100 start 1 c1 0\n",
         "requeued, pending: BeginTime (requeued 1x)"),
        ("running", _job("RUNNING", 1, node="c2"), "100 start 1 c2 1\n", "running on c2 (requeued 1x)"),
        ("interrupted", _job("RUNNING"), "200 start 1 c1 0\n", "starting on c1"),  # the previous launch's status
        ("interrupted", _job("CANCELLED"), "100 start 1 c1 0\n101 exit 75 ended\n", "cancelled"),
        ("failed", _job("FAILED"), "", "failed (exit 1)"),
        ("running", _job("NODE_FAIL"), "", "node failed"),
        ("interrupted", _job("REQUEUED"), "", "requeued"),
        ("finished", None, "100 start 1 c1 0\n150 exit 0 exit\n", "finished"),
        ("interrupted", None, "100 start 1 c1 0\n150 exit 75 stop\n", "stopped"),
        ("failed", None, "100 start 1 c1 0\n150 exit 1 exit\n", "failed (exit 1)"),
        ("running", None, "100 start 1 c1 0\n", "lost"),
        ("starting", None, "", "lost"),
    ],
)  # fmt: skip
def test_shown_state(state: str, job: dict[str, Any] | None, events: str, shown: str) -> None:
    status = {"name": "a", "state": state, "started_at": 150.0}
    assert jobs.shown_state(status, job, jobs.parse_events(events)) == shown


def _b64(value: str | bytes) -> str:
    return base64.b64encode(value.encode() if isinstance(value, str) else value).decode()


def test_collect_checks_every_record() -> None:
    status = {"name": "a", "state": "running", "step": 5, "started_at": 101.0, "message": "ok\x1b[2J"}
    lines = [
        f"S {_b64('a')} {_b64(json.dumps(status))}",
        f"J {_b64('a')} {_b64('100_1')}",
        f"E {_b64('a')} {_b64('100 start 101 c2 1')}",
        f"J {_b64('b')} {_b64('100_4')}",  # pending: no run directory yet
        f"E {_b64('b')} {_b64('')}",
        f"J {_b64('../x')} {_b64('100_2')}",  # not a run name
        f"S {_b64('c')} {_b64(json.dumps({'name': 'other'}))}",  # another run's status
        f"J {_b64('d')} {_b64('1; rm -rf /')}",  # not a task record
        "Q " + _b64(SCONTROL_OUT),
        "garbage",
    ]
    found = collect("\n".join(lines))
    assert sorted(found) == ["a", "b", "d"]
    a, b, d = found["a"], found["b"], found["d"]
    assert a["scheduler"]["shown"] == "running on c2 (requeued 1x)" and a["scheduler"]["active"] is True
    assert a["message"] == "ok [2J" and a["container"] is None
    assert b["scheduler"]["shown"] == "pending: JobArrayTaskLimit" and b["scheduler"]["task"] == "100_4"
    assert d["scheduler"]["task"] is None and d["scheduler"]["active"] is False


def test_job_spec_from_box_fields() -> None:
    box = SimpleNamespace(name="lab", partition="gpu", account=None, qos=None, gpus_per_run=2, time_limit="8")
    spec = job_spec(SimpleNamespace(box=box))  # type: ignore[arg-type]
    assert (spec.gres, spec.time_limit, spec.signal_lead) == ("gpu:2", "8", 120)
    box.time_limit, box.gpus_per_run = "2", 0
    spec = job_spec(SimpleNamespace(box=box))  # type: ignore[arg-type]
    assert (spec.gres, spec.signal_lead) == (None, 30)  # a quarter of a 2-minute limit


FAKE_SBATCH = """#!/bin/bash
echo "sbatch $* in $PWD" >> "$(dirname "$0")/calls"
echo "77;lenslab"
"""
FAKE_SCONTROL = """#!/bin/bash
echo "JobId=77 ArrayJobId=77 ArrayTaskId=0-1 JobState=PENDING Reason=Priority Restarts=0 ExitCode=0:0 NodeList=(null)"
"""


def test_a_sweep_goes_up_and_is_submitted_in_one_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lenslab.providers.slurm.lab import SlurmLab
    from lenslab.remote.bootstrap import LocalRunner
    from lenslab.remote.lab import Lab
    from lenslab.runfile import RunFile

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("sbatch", FAKE_SBATCH), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    src = tmp_path / "src"
    (src / "data").mkdir(parents=True)
    (src / "data" / "corpus.jsonl").write_text('{"text": "hello"}\n')
    runs = [RunFile(src / f"{n}.toml", n, f'name = "{n}"\n', "data/corpus.jsonl") for n in ("a", "b")]
    root = tmp_path / "root"
    calls: list[str] = []

    class Counting(LocalRunner):
        def run(self, command: str, **kwargs: Any) -> Any:
            calls.append(command)
            return super().run(command, **kwargs)

    lab = SlurmLab(Counting(), Lab("b", str(root), "img", False), jobs.JobSpec("b"))
    assert lab.start_runs(runs) == ["Slurm job 77_0", "Slurm job 77_1"]
    assert len(calls) == 2  # what is live already, then upload + sbatch + records
    assert (root / "runs-config/a/a.toml").read_text() == 'name = "a"\n'
    assert (root / "runs-config/b/data/corpus.jsonl").read_text() == '{"text": "hello"}\n'
    assert [(root / f"runs-config/{n}" / jobs.JOB_FILE).read_text() for n in "ab"] == ["77_0\n", "77_1\n"]
    (submitted,) = (bin_dir / "calls").read_text().splitlines()
    script = root / submitted.split()[2]
    assert submitted == f"sbatch --parsable {script.relative_to(root)} in {root}" and os.access(script, os.X_OK)
    shown = {run["name"]: run["scheduler"]["shown"] for run in lab.list_runs()}
    assert shown == {"a": "pending: Priority", "b": "pending: Priority"}
    with pytest.raises(Exception, match="already in Slurm's queue"):
        lab.start_runs(runs[:1])
