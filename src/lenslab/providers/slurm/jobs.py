"""Slurm's side of a run, as plain functions: the batch script, and what Slurm says, checked.

One ``sbatch`` per ``lenslab train``: a job array, one task per run file (a group run file is
one run, so one task). Each task runs ``lenslab-train`` on its run file with the runs on the
shared root, so a task that starts again anywhere resumes from the run's newest checkpoint.

The batch script tells three endings apart by signal:

    USR1   Slurm's warning before the time limit (``--signal=B:USR1@N``): the trainer checkpoints
           (SIGTERM, exit 75) and the script requeues its own task (``scontrol requeue``).
    USR2   ``lenslab stop`` (``scancel --batch -s USR2``): the trainer checkpoints, the task ends.
    TERM   Slurm ends the job (``scancel``, ``scontrol requeue``, preemption): Slurm signals the
           trainer itself, so the script only waits for it; Slurm decides whether it comes back.

A lost node kills the task outright; Slurm requeues it (``--requeue``) once it declares the node
down. The script appends one line per start and end to the run's ``task-events`` file; the
laptop reads it with the controller's record of each task (``scontrol -o show job``).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from typing import Any

from lenslab.contract import EXIT_INTERRUPTED, LOG_FILE, RUNS_DIR, is_run_name
from lenslab.remote.boxstate import text

# Where the batch scripts and Slurm's own output (before a task knows its run) live.
SLURM_DIR = "slurm"
JOB_FILE = "task"  # in the run's config directory: "<array job id>_<task>"
EVENTS_FILE = "task-events"  # in the run's config directory, appended by the batch script
CONSOLE_FILE = "console.log"  # in the run directory: everything the trainer prints
# Slurm's warning before the time limit: enough for a checkpoint of a large SAE.
SIGNAL_LEAD_SECONDS = 120
JOB_ID = re.compile(r"[0-9]{1,12}")
TASK_JOB = re.compile(r"([0-9]{1,12})_([0-9]{1,7})")
ACTIVE = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
          "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT")  # fmt: skip
STATES = (*ACTIVE, "COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
          "DEADLINE", "OUT_OF_MEMORY", "SPECIAL_EXIT", "REVOKED")  # fmt: skip
_ENDED = {"CANCELLED": "cancelled", "FAILED": "failed", "TIMEOUT": "timed out", "NODE_FAIL": "node failed",
          "PREEMPTED": "preempted", "BOOT_FAIL": "node failed to boot", "DEADLINE": "past its deadline",
          "OUT_OF_MEMORY": "out of memory", "REVOKED": "revoked", "SPECIAL_EXIT": "held after a failure"}  # fmt: skip
_FIELD = re.compile(r"(?:^| )(JobId|ArrayJobId|ArrayTaskId|JobState|Reason|Restarts|NodeList|ExitCode)=(\S*)")
_TASKS = re.compile(r"[0-9,:%-]{1,200}")
_REASON = re.compile(r"[A-Za-z0-9_:,.()/+-]{1,80}")
_NODES = re.compile(r"[A-Za-z0-9_.,\[\]-]{1,120}")
MAX_TASKS = 10000


@dataclass(frozen=True)
class JobSpec:
    """What ``sbatch`` is asked for, from lenslab.toml; None leaves it to the cluster's defaults."""

    box: str
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    gres: str | None = None  # e.g. "gpu:1"
    time_limit: str | None = None  # Slurm's form: minutes, "HH:MM:SS" or "D-HH:MM:SS"
    signal_lead: int = SIGNAL_LEAD_SECONDS

    def options(self, root: str, tasks: int) -> list[str]:
        out = [
            f"--job-name=lenslab-{self.box}",
            f"--array=0-{tasks - 1}",
            "--requeue",
            f"--signal=B:USR1@{self.signal_lead}",
            "--open-mode=append",
            # Relative to the submit directory (the root: sbatch runs there), because sbatch
            # splits a directive at whitespace and would cut a root with a space in it.
            f"--output={SLURM_DIR}/out/%A_%a.out",
            "--nodes=1",
            "--ntasks=1",
        ]
        for flag, value in (("partition", self.partition), ("account", self.account), ("qos", self.qos),
                            ("gres", self.gres), ("time", self.time_limit)):  # fmt: skip
            if value is not None:
                out.append(f"--{flag}={value}")
        return out


# The batch script. Traps first (a signal before the trainer starts is still seen), the
# trainer in the background so a trapped signal interrupts `wait`, and its exit code waited
# for until it really exits (a trap interrupts `wait` with a code above 128).
_BODY = """\
set -u
why=
# One SIGTERM only: a second one makes the trainer exit at once, without the checkpoint the
# first one started (a stop during the time limit's checkpoint, a stop asked twice).
ask() { why=$1; [ -n "${pid:-}" ] && [ -z "${asked:-}" ] && { asked=1; kill -TERM "$pid"; }; }
trap 'ask requeue' USR1
trap 'ask stop' USR2
trap 'why=${why:-ended}' TERM
root=%(root)s
names=(%(names)s)
files=(%(files)s)
name=${names[$SLURM_ARRAY_TASK_ID]}
conf="$root/runs-config/$name"
rundir="$root/%(runs)s/$name"
mkdir -p "$rundir"
note() { printf '%%s %%s\\n' "$(date +%%s)" "$*" >> "$conf/%(events)s"; }
say() { printf '%%s slurm: %%s\\n' "$(date '+%%Y-%%m-%%d %%H:%%M:%%S')" "$*" >> "$rundir/%(log)s"; }
node=${SLURMD_NODENAME:-$(hostname)}
note start "$SLURM_JOB_ID" "$node" "${SLURM_RESTART_COUNT:-0}"
say "job ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID} started on $node (restart ${SLURM_RESTART_COUNT:-0})"
if [ "$why" = requeue ]; then  # the time limit's warning before the trainer started: again later
  note exit %(interrupted)d requeue; scontrol requeue "$SLURM_JOB_ID" && exit 0
  note exit %(interrupted)d exit; exit %(interrupted)d
fi
[ -z "$why" ] || { note exit 0 "$why"; exit 0; }
export HF_HOME="$root/hf-cache" PYTHONUNBUFFERED=1
%(train)s "$conf/${files[$SLURM_ARRAY_TASK_ID]}" --runs-dir "$root/%(runs)s" >> "$rundir/%(console)s" 2>&1 < /dev/null &
pid=$!
rc=0
while :; do
  wait "$pid"; rc=$?
  [ "$rc" -gt 128 ] && kill -0 "$pid" 2>/dev/null && continue
  break
done
if [ "$rc" -gt 128 ]; then wait "$pid" 2>/dev/null; r=$?; [ "$r" -eq 127 ] || rc=$r; fi
action=${why:-exit}
if [ "$rc" -eq %(interrupted)d ] && [ "$why" = requeue ]; then
  # Written before the requeue, which ends this very job.
  note exit "$rc" requeue
  say "trainer checkpointed (exit $rc) before the time limit; requeueing"
  scontrol requeue "$SLURM_JOB_ID" && exit 0
  note exit "$rc" exit
  say "the requeue failed; run lenslab train again to continue from the checkpoint"
  exit "$rc"
fi
note exit "$rc" "$action"
say "trainer exited $rc ($action)"
[ "$action" = stop ] && exit 0
exit "$rc"
"""


def render_script(spec: JobSpec, root: str, train: str, runs: list[tuple[str, str]]) -> str:
    """The array's batch script: ``runs`` is (run name, run file name in its config dir) per task."""
    if not runs:
        raise ValueError("a job array needs at least one run")
    for name, _ in runs:
        if not is_run_name(name):
            raise ValueError(f"not a run name: {name!r}")
    head = "#!/bin/bash\n" + "".join(f"#SBATCH {option}\n" for option in spec.options(root, len(runs)))
    body = _BODY % {
        "root": shlex.quote(root),
        "names": " ".join(shlex.quote(name) for name, _ in runs),
        "files": " ".join(shlex.quote(file) for _, file in runs),
        "runs": RUNS_DIR,
        "events": EVENTS_FILE,
        "log": LOG_FILE,
        "console": CONSOLE_FILE,
        "train": shlex.quote(train),
        "interrupted": EXIT_INTERRUPTED,
    }
    return head + body


def parse_job_id(out: str) -> str | None:
    """``sbatch --parsable``'s answer ("1234" or "1234;cluster"), checked."""
    first = out.strip().split(";", 1)[0]
    return first if JOB_ID.fullmatch(first) else None


def expand_tasks(spec: str) -> set[int]:
    """Slurm's task list ("0-3,5", "0-7:2", "1-9%2"), as the set of task ids; empty if malformed."""
    if not _TASKS.fullmatch(spec):
        return set()
    out: set[int] = set()
    for part in spec.split("%", 1)[0].split(","):
        match = re.fullmatch(r"([0-9]{1,7})(?:-([0-9]{1,7})(?::([0-9]{1,7}))?)?", part)
        if match is None:
            return set()
        first = int(match[1])
        last = int(match[2]) if match[2] else first
        step = int(match[3]) if match[3] else 1
        if step == 0 or last < first or len(out) + (last - first) // step >= MAX_TASKS:
            return set()
        out.update(range(first, last + 1, step))
    return out


def parse_jobs(out: str) -> list[dict[str, Any]]:
    """``scontrol -o show job``'s lines, checked: the fields lenslab uses, or the line is skipped."""
    jobs = []
    for line in out.splitlines()[:MAX_TASKS]:
        fields = dict(_FIELD.findall(line))
        array, tasks = fields.get("ArrayJobId", ""), fields.get("ArrayTaskId", "")
        if not JOB_ID.fullmatch(fields.get("JobId", "")) or not JOB_ID.fullmatch(array):
            continue
        state = fields.get("JobState", "")
        restarts = fields.get("Restarts", "")
        reason, nodes = fields.get("Reason", ""), fields.get("NodeList", "")
        code = re.fullmatch(r"([0-9]{1,3}):([0-9]{1,3})", fields.get("ExitCode", ""))
        jobs.append({
            "job": fields["JobId"],
            "array": array,
            "tasks": expand_tasks(tasks),
            "state": state if state in STATES else "UNKNOWN",
            "reason": reason if _REASON.fullmatch(reason) and reason != "None" else None,
            "restarts": int(restarts) if restarts.isdigit() and len(restarts) < 7 else 0,
            "node": nodes if _NODES.fullmatch(nodes) and nodes != "(null)" else None,
            "exit_code": int(code[1]) if code else None,
        })  # fmt: skip
    return jobs


def find_task(jobs: list[dict[str, Any]], record: str) -> dict[str, Any] | None:
    """The controller's record of task "<array>_<task>" (a pending remainder covers several)."""
    match = TASK_JOB.fullmatch(record)
    if match is None:
        return None
    task = int(match[2])
    found = [job for job in jobs if job["array"] == match[1] and task in job["tasks"]]
    # A task split off its array's pending remainder has its own record: that one wins.
    found.sort(key=lambda job: len(job["tasks"]))
    return found[0] if found else None


def parse_events(raw: str) -> dict[str, Any]:
    """The batch script's last start and end of the run: times, node, restart count, exit code."""
    out: dict[str, Any] = {"started": None, "node": None, "restart": 0, "ended": None, "exit_code": None,
                           "action": None}  # fmt: skip
    for line in raw.splitlines()[-64:]:
        fields = line.split(" ")
        if len(fields) == 5 and fields[1] == "start" and fields[0].isdigit() and JOB_ID.fullmatch(fields[2]):
            out.update(started=int(fields[0]), node=text(fields[3], 64), ended=None, exit_code=None, action=None)
            out["restart"] = int(fields[4]) if fields[4].isdigit() and len(fields[4]) < 7 else 0
        elif len(fields) == 4 and fields[1] == "exit" and fields[0].isdigit() and fields[2].isdigit():
            action = fields[3] if fields[3] in ("exit", "stop", "requeue", "ended") else "exit"
            out.update(ended=int(fields[0]), exit_code=int(fields[2][:3]), action=action)
    return out


def shown_state(status: dict[str, Any], job: dict[str, Any] | None, events: dict[str, Any]) -> str:
    """What ``lenslab runs`` shows for a run: the queue's word while Slurm has the task, the
    trainer's (status.json) while it runs, and how it ended once it has."""
    state = str(status.get("state"))
    started = events["started"]
    # A status older than this start is the previous launch's: it says nothing of this one.
    current = started is not None and (status.get("started_at") or 0) >= started - 1
    again = job["restarts"] if job else events["restart"]
    requeued = f"requeued {again}x" if again else ""
    if job is not None and job["state"] in ACTIVE:
        slurm = str(job["state"])
        if slurm == "PENDING":
            why = f": {job['reason']}" if job["reason"] else ""
            return f"requeued, pending{why} ({requeued})" if again else f"pending{why}"
        if slurm.startswith("REQUEUE"):
            return "requeued"
        if slurm in ("RUNNING", "CONFIGURING", "COMPLETING"):
            shown = state if current and events["ended"] is None else "starting"
            where = f" on {job['node']}" if job["node"] else ""
            return shown + where + (f" ({requeued})" if requeued else "")
        return slurm.lower()
    if job is not None and job["state"] in _ENDED:
        return _ENDED[job["state"]] + (f" (exit {job['exit_code']})" if job["state"] == "FAILED" else "")
    return _ended_state(state, events)


def _ended_state(state: str, events: dict[str, Any]) -> str:
    """The task is done (or the controller forgot it): the script's record says how it ended."""
    if events["ended"] is None:
        if events["started"] is None:
            return state if state not in ("running", "starting") else "lost"
        return "lost" if state in ("running", "starting") else state
    code, action = events["exit_code"], events["action"]
    if code == 0 and state == "finished":
        return "finished"
    if code == EXIT_INTERRUPTED:
        return {"stop": "stopped", "requeue": "requeued", "ended": "cancelled"}.get(str(action), "interrupted")
    return f"failed (exit {code})"
