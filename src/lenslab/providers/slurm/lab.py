"""The lab on a Slurm cluster, reached through its login node (``lenslab.remote.labs`` opens it
through ``SlurmProvider.scheduler_lab``).

A run is a task of a job array (``jobs`` renders the script); its files live on the
cluster's shared file system under the persistent root, laid out as on any box, so ``pull``
and a resume on any node read the same run directory. The laptop keeps no state: each run's
config directory holds the task it was submitted as (``task``) and what its batch script
recorded (``task-events``); the queue's word comes from ``scontrol``, progress from the run's
``status.json``. Everything read from the cluster is checked before use.
"""

from __future__ import annotations

import base64
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lenslab.contract import EXIT_INTERRUPTED, RUNS_DIR, STATUS_FILE, STOP_TIMEOUT_SECONDS, is_run_name
from lenslab.errors import LenslabError, RemoteError
from lenslab.providers.slurm import jobs
from lenslab.remote.boxstate import LOG_TAIL_LINES, MAX_STATUS_BYTES, clean_status, text
from lenslab.remote.lab import Lab
from lenslab.remote.slurmbox import venv_path
from lenslab.remote.training import POLL_SECONDS, RunAlreadyRunning, RunDidNotStart, upload

if TYPE_CHECKING:
    from lenslab.config import Config
    from lenslab.remote.bootstrap import Runner
    from lenslab.remote.follow import Follower
    from lenslab.runfile import RunFile

MAX_REPLY_BYTES = 1 << 24
# Run files and datasets up to this size go up as one tar stream with the submission.
MAX_BUNDLE_BYTES = 256 << 20
FOLLOW_POLL_SECONDS = 1


def job_spec(cfg: Config) -> jobs.JobSpec:
    """``sbatch``'s options from the ``[box]`` fields of a Slurm box (None: the cluster's default).
    The time-limit warning comes at most a quarter of the limit early, so a short limit still runs."""
    from lenslab.providers.slurm.fields import time_limit_seconds

    box = cfg.box
    limit = time_limit_seconds(box.time_limit)
    lead = jobs.SIGNAL_LEAD_SECONDS if limit is None else max(10, min(jobs.SIGNAL_LEAD_SECONDS, limit // 4))
    return jobs.JobSpec(
        box=box.name,
        partition=box.partition,
        account=box.account,
        qos=box.qos,
        gres=f"gpu:{box.gpus_per_run}" if box.gpus_per_run else None,
        time_limit=box.time_limit,
        signal_lead=lead,
    )


@dataclass
class SlurmLab:
    """The lab backend of a Slurm cluster (see ``lenslab.remote.labs.LabBackend``)."""

    runner: Runner
    lab: Lab
    spec: jobs.JobSpec
    jupyter_port: int = 8888  # where a new Jupyter listens on the login node (box.jupyter_port)

    def _run_dir(self, name: str) -> str:
        return f"{self.lab.root}/{RUNS_DIR}/{name}"

    # -- submitting -----------------------------------------------------------------------------

    def start_run(self, run: RunFile) -> str:
        return self.start_runs([run])[0]

    def start_runs(self, runs: list[RunFile]) -> list[str]:
        """Upload every run file, then submit them as one job array; each run's task id."""
        names = [run.name for run in runs]
        if len(set(names)) != len(names):
            raise LenslabError("two run files of the sweep have the same run name", "give each its own `name`")
        live = {status["name"]: status["scheduler"] for status in self.list_runs() if status["scheduler"]["active"]}
        for name in names:
            if name in live:
                raise RunAlreadyRunning(
                    f"run {name} is already in Slurm's queue ({live[name]['shown']}) on box {self.lab.box}",
                    f"follow it with `lenslab logs {name} -f`, stop it with `lenslab stop {name}`, "
                    "or pick another name",
                )
        stamp = f"{int(time.time() * 1000)}-{names[0]}"
        script = f"{jobs.SLURM_DIR}/jobs/{stamp}.sh"
        train = f"{venv_path(self.lab.root)}/bin/lenslab-train"
        text_ = jobs.render_script(self.spec, self.lab.root, train, [(r.name, r.path.name) for r in runs])
        bundle = _bundle(runs, script, text_.encode())
        if bundle is None:  # too large to hold in memory: streamed file by file first
            from lenslab.remote.training import Paths

            for run in runs:
                upload(self.runner, run, Paths(self.lab.root, run.name))
            self.runner.put(text_.encode(), f"{self.lab.root}/{script}", 0o755)
        # One round trip: unpack, submit, and record each run's task (submission is what a
        # user waits for; every exec over SSH costs a round trip).
        records = " && ".join(
            f"printf '%s_{i}\\n' \"$jid\" > {shlex.quote(f'runs-config/{name}/{jobs.JOB_FILE}')}"
            for i, name in enumerate(names)
        )
        result = self.runner.run(
            in_bash(
                f'root={shlex.quote(self.lab.root)} && mkdir -p "$root" && cd "$root" && mkdir -p {jobs.SLURM_DIR}/out '
                + ("&& tar -xf - " if bundle is not None else "")
                + f"&& jid=$(sbatch --parsable {shlex.quote(script)}) && jid=${{jid%%;*}} "
                + "&& case $jid in ''|*[!0-9]*) exit 3;; esac "
                + f'&& {{ {records} || {{ printf "submitted as job %s, but its runs were not recorded: scancel %s\\n" '
                + '"$jid" "$jid" >&2; exit 4; }; } && printf "%s\\n" "$jid"'
            ),
            stdin=bundle,
        )
        array = jobs.parse_job_id(result.stdout) if result.exit_status == 0 else None
        if result.exit_status == 4:  # queued, but `runs` and `stop` cannot see it: say how to end it
            said = [line for line in result.stderr.splitlines() if line.strip()] or ["submitted, but not recorded"]
            raise LenslabError(text(said[-1], 200), "free space on the root, then train again")
        if array is None:
            lines = [line for line in result.stderr.splitlines() if line.strip()]
            why = text(lines[-1] if lines else result.stdout or f"exit {result.exit_status}", 200)
            raise LenslabError(
                f"Slurm refused the job: {why}",
                "check partition, account, qos, gpus_per_run and time_limit in [box] (`sinfo` lists the cluster's)",
            )
        return [f"Slurm job {array}_{i}" for i in range(len(names))]

    def wait_started(self, name: str, timeout: float) -> dict[str, Any]:
        """The run's first status: at once while Slurm still queues it (a queue may hold it for
        hours); once its task runs, the status its trainer wrote, or why it ended first."""
        deadline = time.monotonic() + timeout
        while True:
            status = self._one(name)
            slurm = status["scheduler"]
            current = slurm["started"] is not None and (status.get("started_at") or 0) >= slurm["started"] - 1
            if current and status["state"] in ("starting", "running", "finished"):
                return status
            if not slurm["active"] or slurm["ended"] is not None:
                raise self._not_started(name, f"its Slurm task ended before the trainer started ({slurm['shown']})")
            if slurm["queue"] == "PENDING" or time.monotonic() >= deadline:
                return {**status, "state": slurm["shown"]}
            time.sleep(POLL_SECONDS)

    def _not_started(self, name: str, why: str) -> RunDidNotStart:
        log = shlex.quote(f"{self._run_dir(name)}/{jobs.CONSOLE_FILE}")
        out = self.runner.run(in_bash(f"tail -n {LOG_TAIL_LINES} {log} 2>/dev/null"))
        tail = [text(line) for line in out.stdout.splitlines() if line.strip()][-LOG_TAIL_LINES:]
        return RunDidNotStart(
            f"run {name} did not start: {why}",
            f"see `lenslab logs {name}`; fix the cause, then run `lenslab train` again",
            tail,
        )

    # -- what the cluster says ------------------------------------------------------------------

    def list_runs(self) -> list[dict[str, Any]]:
        """Every run on the shared root, with its task's queue state (``slurm``); one round trip."""
        found = self._query()
        return [found[name] for name in sorted(found)]

    def _one(self, name: str) -> dict[str, Any]:
        status = self._query().get(name)
        if status is None:
            raise LenslabError(f"run {name} is not on box {self.lab.box}", "see the runs with `lenslab runs`")
        return status

    def _query(self) -> dict[str, dict[str, Any]]:
        root = shlex.quote(self.lab.root)
        # Records: "S|J|E <base64 name> <base64 content>", then "Q <base64 scontrol lines>".
        # Job ids come from files on the shared root: only digits reach scontrol.
        command = (
            f"root={root}; ids=; "
            f'for f in "$root"/{RUNS_DIR}/*/{STATUS_FILE}; do [ -f "$f" ] || continue; d=${{f%/*}}; '
            f'printf "S %s %s\\n" "$(printf %s "${{d##*/}}" | base64 -w0)" '
            f'"$(head -c {MAX_STATUS_BYTES} "$f" | base64 -w0)"; done; '
            f'for f in "$root"/runs-config/*/{jobs.JOB_FILE}; do [ -f "$f" ] || continue; d=${{f%/*}}; '
            f'n=$(printf %s "${{d##*/}}" | base64 -w0); j=$(head -c 40 "$f"); '
            f'printf "J %s %s\\n" "$n" "$(printf %s "$j" | base64 -w0)"; '
            f'e=$(tail -n 16 "$d/{jobs.EVENTS_FILE}" 2>/dev/null | head -c 4096 | base64 -w0); '
            'printf "E %s %s\\n" "$n" "$e"; '
            f'a=${{j%%_*}}; case "$a" in ""|*[!0-9]*) ;; *) ids="$ids $a";; esac; done; '
            'ids=$(printf "%s\\n" $ids | sort -u); '
            'printf "Q %s\\n" "$(for a in $ids; do scontrol -o show job "$a" 2>/dev/null; done | base64 -w0)"'
        )
        result = self.runner.run(in_bash(command))
        if result.exit_status != 0:
            raise RemoteError(f"cannot list the runs on the cluster: {text(result.stderr or result.stdout, 200)}")
        return collect(result.stdout[:MAX_REPLY_BYTES])

    # -- stopping -------------------------------------------------------------------------------

    def stop_run(self, name: str) -> int | None:
        """Stop gracefully without a requeue: the trainer checkpoints and exits 75; its exit
        code, or None when Slurm has no live task for the run."""
        status = self._one(name)
        slurm = status["scheduler"]
        if not slurm["active"] or slurm["task"] is None:
            return None
        task = shlex.quote(slurm["task"])
        if slurm["queue"] != "RUNNING":
            # Nothing runs: the task leaves the queue; its checkpoints stay for a later `train`.
            self.runner.run(f"scancel {task}", check=True)
            return EXIT_INTERRUPTED if status.get("last_checkpoint") else 0
        # The login node's clock, not the laptop's: the exit record is stamped on the cluster.
        said = self.runner.run(in_bash(f"scancel --batch --signal=USR2 {task} && date +%s"), check=True).stdout.split()
        asked = int(said[-1]) if said and said[-1].isdigit() else 0
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS + 30
        while time.monotonic() < deadline:
            time.sleep(POLL_SECONDS)
            slurm = self._one(name)["scheduler"]
            if slurm["ended"] is not None and slurm["ended"] >= int(asked) - 1:
                return int(slurm["exit_code"])
            if not slurm["active"]:
                return -1  # it ended without its script's word (killed, its node lost)
        raise LenslabError(
            f"run {name} did not stop within {STOP_TIMEOUT_SECONDS + 30}s",
            f"see `lenslab logs {name}`; `scancel {slurm['task']}` on the login node ends it at once",
        )

    def stop_all(self) -> list[str]:
        """Stop every live task gracefully; their runs' names. (`lenslab down` leaves a cluster's
        jobs alone: the queue is the user's, not a machine lenslab rents.)"""
        return [
            s["name"] for s in self.list_runs() if s["scheduler"]["active"] and self.stop_run(s["name"]) is not None
        ]

    # -- logs -----------------------------------------------------------------------------------

    def stream_log(self, follower: Follower, follow: bool) -> bool:
        """Print the run's console log from the byte the follower got to; with ``follow``, until
        its task leaves Slurm's queue (a requeued task is followed through its restart)."""
        from lenslab.remote.follow import stream_command

        status = self._one(follower.name)
        log = shlex.quote(f"{self._run_dir(follower.name)}/{jobs.CONSOLE_FILE}")
        task = status["scheduler"]["task"] if follow and status["scheduler"]["active"] else None
        alive = f"squeue -h -j {shlex.quote(task)} -o %T 2>/dev/null | grep -q ." if task else "false"
        command = (
            f"off={int(follower.offset)}; "
            f'show() {{ s=$(stat -c %s {log} 2>/dev/null || echo 0); [ "$s" -gt "$off" ] || return 0; '
            f"tail -c +$((off + 1)) {log} | head -c $((s - off)); off=$s; }}; "
            f"while {alive}; do show; sleep {FOLLOW_POLL_SECONDS}; done; show"
        )

        def sink(chunk: bytes) -> None:
            follower.offset += len(chunk)
            follower.out.write(chunk)
            follower.out.flush()

        stream_command(self.runner, in_bash(command), sink)
        return False

    def jupyter_access(self) -> tuple[int, str]:
        """Jupyter on the login node (on 127.0.0.1; `lenslab jupyter` tunnels to it), started by
        the lenslab-box of the venv on the shared root: researchers already work there."""
        from lenslab.remote.processlab import BOX_COMMAND, ask, jupyter_answer
        from lenslab.remote.slurmbox import venv_path

        box = f"{venv_path(self.lab.root)}/bin/{BOX_COMMAND}"
        return jupyter_answer(ask(self.runner, self.lab.root, "jupyter", "--json", "--port", str(self.jupyter_port),
                                  box=box))  # fmt: skip


def in_bash(command: str) -> str:
    """``command`` run by bash, whatever the login shell is (tcsh, zsh: their loops, globs and
    word splitting differ from what these scripts are written for)."""
    return f"bash -c {shlex.quote(command)}"


def collect(out: str) -> dict[str, dict[str, Any]]:
    """The records of ``_query``, checked: run name -> status with its ``slurm`` facts."""
    statuses: dict[str, dict[str, Any]] = {}
    records: dict[str, str] = {}
    events: dict[str, dict[str, Any]] = {}
    queue: list[dict[str, Any]] = []
    for line in out.splitlines():
        kind, *fields = line.split(" ")
        if kind == "Q" and len(fields) == 1:
            queue = jobs.parse_jobs(_b64(fields[0]))
            continue
        if kind not in ("S", "J", "E") or len(fields) != 2:
            continue
        name, content = _b64(fields[0]), _b64(fields[1])
        if not is_run_name(name):
            continue
        if kind == "S":
            checked = clean_status(_json(content), name)
            if checked is not None:
                statuses[name] = checked
        elif kind == "J":
            records[name] = content.strip()
        else:
            events[name] = jobs.parse_events(content)
    found: dict[str, dict[str, Any]] = {}
    for name in sorted(set(statuses) | set(records)):
        status = statuses.get(name) or {"name": name, "state": "starting", "last_checkpoint": None}
        record = records.get(name)
        task = record if record is not None and jobs.TASK_JOB.fullmatch(record) else None
        job = jobs.find_task(queue, task) if task else None
        ev = events.get(name) or jobs.parse_events("")
        status["scheduler"] = {
            "task": task,
            "queue": job["state"] if job else None,
            "reason": job["reason"] if job else None,
            "node": job["node"] if job else ev["node"],
            "restarts": job["restarts"] if job else ev["restart"],
            "active": job is not None and job["state"] in jobs.ACTIVE,
            "started": ev["started"],
            "ended": ev["ended"],
            "exit_code": ev["exit_code"],
            "shown": jobs.shown_state(status, job, ev),
        }
        status["container"] = None  # no container: `runs` shows the ``slurm`` facts instead
        found[name] = status
    return found


def _bundle(runs: list[RunFile], script: str, body: bytes) -> bytes | None:
    """Every run's uploads (under ``runs-config/<name>/``) and the batch script, as one tar; None
    when the datasets are too large to hold in memory."""
    import io
    import tarfile

    files: list[tuple[str, bytes, int]] = [(script, body, 0o755)]
    size = len(body)
    for run in runs:
        for rel, source in run.uploads().items():
            if isinstance(source, Path) and (size := size + source.stat().st_size) > MAX_BUNDLE_BYTES:
                return None
            data = source.read_bytes() if isinstance(source, Path) else source
            files.append((f"runs-config/{run.name}/{rel}", data, 0o644))
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data, mode in files:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, int(time.time())
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _b64(value: str) -> str:
    try:
        return base64.b64decode(value, validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return ""


def _json(value: str) -> Any:
    import json

    try:
        return json.loads(value)
    except (ValueError, RecursionError):
        return None
