"""`provider = "slurm"`: `lenslab up` on a real Slurm cluster's login node (tests/support/slurm_cluster.py).

`up` checks Slurm's client commands and the shared root, installs lenslab into a venv on the
shared root (compute nodes run lenslab-train from it), and a second `up` reuses that venv.
`status` reports the cluster; `down` cancels no job. Bad `[box]` fields, a login node without
sbatch and a root that cannot be written are each one line and a non-zero exit.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from lenslab import files
from lenslab.providers.slurm.fields import time_limit_seconds
from lenslab.remote.slurmbox import STAMP_FILE, parse_facts
from tests.support.slurm_cluster import SlurmCluster, lenslab, lenslab_toml


def wait_job(cluster: SlurmCluster, job: str, timeout: float = 60) -> str:
    """The job's final state, as scontrol shows it."""
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        out = cluster.exec("ctl", ["scontrol", "show", "job", job, "-o"]).stdout
        state = next((w.split("=", 1)[1] for w in out.split() if w.startswith("JobState=")), "")
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        time.sleep(0.5)
    raise AssertionError(f"job {job} still {state or 'unknown'} after {timeout:.0f}s")


def sbatch(cluster: SlurmCluster, *args: str) -> str:
    out = cluster.exec("ctl", ["sbatch", "--parsable", *args], user=cluster.user)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lenslab: error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.mark.slow
def test_sbatch_job_runs_on_a_compute_node_and_sees_the_shared_fs(slurm_cluster: SlurmCluster) -> None:
    """The fixture's cluster: a batch job runs on c1 or c2 as the login user, with torch, and
    writes to the shared FS that the login node and the test host both see."""
    out_name = f"wrap-{uuid.uuid4().hex[:8]}.txt"
    job = sbatch(
        slurm_cluster, "-o", f"{slurm_cluster.shared_root}/{out_name}",
        "--wrap", "hostname; id -un; python3 -c 'import torch; print(torch.ones(2).sum().item())'",
    )  # fmt: skip
    assert wait_job(slurm_cluster, job) == "COMPLETED"
    node, user, total = (slurm_cluster.host_shared / "lenslab" / out_name).read_text().split()
    assert node in slurm_cluster.nodes and node != "ctl"
    assert (user, total) == (slurm_cluster.user, "2.0")


@pytest.mark.slow
def test_up_installs_on_the_shared_root_reuses_it_and_down_cancels_nothing(
    slurm_cluster: SlurmCluster, keypair: Path, slurm_sources: Path, project: Path
) -> None:
    root = f"{slurm_cluster.shared_root}/up-{uuid.uuid4().hex[:8]}"
    (project / "lenslab.toml").write_text(lenslab_toml(slurm_cluster, slurm_sources).replace(
        f'root = "{slurm_cluster.shared_root}"', f'root = "{root}"'))  # fmt: skip
    first = lenslab(project, "up", "--json")
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout)["bootstrap"]
    venv = f"{root}/.lenslab/venv"
    assert (summary["root"], summary["scheduler"]["venv"]["venv"], summary["scheduler"]["venv"]["installed"]) == (
        root, venv, True)  # fmt: skip
    assert (summary["scheduler"]["name"], summary["scheduler"]["version"][:5]) == ("Slurm", "22.05")
    host_venv = slurm_cluster.host_shared / venv.removeprefix("/shared/")
    assert "include-system-site-packages = true" in (host_venv / "pyvenv.cfg").read_text()
    stamp = host_venv / STAMP_FILE
    installed = (stamp.stat().st_mtime_ns, stamp.read_text(), (host_venv / "bin" / "lenslab-train").stat().st_ino)

    # `ssh` goes to the login node, with its host key pinned by `up`; so does OpenSSH's alias.
    shell = lenslab(project, "ssh", "--", "hostname")
    assert (shell.returncode, shell.stdout.strip()) == (0, "ctl"), shell.stderr
    pinned = subprocess.run(["ssh-keygen", "-lf", str(files.known_hosts_path())], capture_output=True, text=True)
    assert slurm_cluster.host_key_fingerprint() in pinned.stdout
    alias = subprocess.run(["ssh", "-F", str(files.config_path()), "-o", "BatchMode=yes", "lenslab-slurm", "sinfo",
                            "-h", "-o", "%P"], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert (alias.returncode, alias.stdout.strip()) == (0, f"{slurm_cluster.partition}*"), alias.stderr

    # A compute node runs lenslab-train from the shared root.
    out = f"{root}/train-help.txt"
    job = sbatch(slurm_cluster, "-o", out, "--wrap", f"hostname; {venv}/bin/lenslab-train --help")
    assert wait_job(slurm_cluster, job) == "COMPLETED"
    text = (slurm_cluster.host_shared / out.removeprefix("/shared/")).read_text()
    assert text.split()[0] in slurm_cluster.nodes and "usage" in text.lower()

    second = lenslab(project, "up")
    assert second.returncode == 0, second.stderr
    assert "Slurm 22.05" in second.stdout and f"lenslab in {venv}, root {root}" in second.stdout, second.stdout
    assert "changed: nothing (already ready)" in second.stdout
    after = (stamp.stat().st_mtime_ns, stamp.read_text(), (host_venv / "bin" / "lenslab-train").stat().st_ino)
    assert after == installed

    status = lenslab(project, "status", "--json")
    assert status.returncode == 0, status.stderr
    facts = json.loads(status.stdout)
    assert (facts["reachable"], facts["root"], facts["root_exists"]) == (True, root, True)
    (partition,) = facts["scheduler"]["partitions"]
    assert (partition["name"], partition["default"], partition["nodes"]) == (slurm_cluster.partition, True, 2)
    assert sorted(n["name"] for n in facts["scheduler"]["nodes"]) == sorted(slurm_cluster.nodes)
    shown = lenslab(project, "status")
    assert shown.returncode == 0 and f"Slurm: partitions {slurm_cluster.partition}*" in shown.stdout, shown.stdout

    # `down` stands down nothing on a shared cluster: a job of the user's keeps running.
    sleeper = sbatch(slurm_cluster, "-o", "/dev/null", "--wrap", "sleep 120")
    down = lenslab(project, "down")
    assert down.returncode == 0, down.stderr
    assert "Slurm jobs were not cancelled" in down.stdout
    queued = slurm_cluster.exec("ctl", ["squeue", "-h", "-j", sleeper, "-o", "%T"]).stdout.split()
    assert queued in (["RUNNING"], ["PENDING"])
    slurm_cluster.exec("ctl", ["scancel", sleeper])


@pytest.mark.slow
def test_up_without_slurm_commands_is_one_line(slurm_cluster: SlurmCluster, slurm_project: Path) -> None:
    """A login node without sbatch (not the cluster's login node, or Slurm not loaded)."""
    moved = slurm_cluster.exec("ctl", ["mv", "/usr/bin/sbatch", "/usr/bin/sbatch.away"])
    assert moved.returncode == 0, moved.stderr
    try:
        up = lenslab(slurm_project, "up")
    finally:
        slurm_cluster.exec("ctl", ["mv", "/usr/bin/sbatch.away", "/usr/bin/sbatch"])
    assert up.returncode == 4
    line = one_error_line(up.stderr)
    assert "login node has no sbatch on its PATH" in line


@pytest.mark.slow
def test_up_with_a_root_it_cannot_write_is_one_line(
    slurm_cluster: SlurmCluster, keypair: Path, slurm_sources: Path, project: Path
) -> None:
    text = lenslab_toml(slurm_cluster, slurm_sources).replace(
        f'root = "{slurm_cluster.shared_root}"', 'root = "/etc/lenslab"'
    )
    (project / "lenslab.toml").write_text(text)
    up = lenslab(project, "up")
    assert up.returncode == 4
    assert "persistent root /etc/lenslab on the login node is not a writable directory" in one_error_line(up.stderr)
    assert slurm_cluster.exec("ctl", ["test", "-e", "/etc/lenslab"]).returncode == 1


BASE = '[box]\nname = "c"\nprovider = "slurm"\nhost = "127.0.0.1"\nuser = "lab"\n'


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ('partition = "gpu nodes"', "box.partition: String should match pattern"),
        ('account = "a;rm"', "box.account: String should match pattern"),
        ("gpus_per_run = -1", "box.gpus_per_run: Input should be greater than or equal to 0"),
        ('gpus_per_run = "1"', "box.gpus_per_run: Input should be a valid integer (got '1')"),
        ('time_limit = "1 hour"', "box.time_limit: String should match pattern"),
        ("time_limit = 60", "box.time_limit: Input should be a valid string (got 60)"),
        ('apptainer = "/images/lenslab.sif"', "box: apptainer is not supported yet"),
        ('engine = "none"', 'box: engine is not for provider "slurm"'),
        ("qos = 'normal'\nslurm_partition = 'x'", "box.slurm_partition: unknown field"),
    ],
)
def test_bad_slurm_fields_are_one_line(project: Path, extra: str, expected: str) -> None:
    (project / "lenslab.toml").write_text(BASE + extra + "\n")
    result = lenslab(project, "up")
    assert result.returncode == 2
    line = one_error_line(result.stderr)
    assert f"{project / 'lenslab.toml'}: {expected}" in line, line


def test_slurm_fields_belong_to_slurm_boxes(project: Path) -> None:
    text = BASE.replace('"slurm"', '"ssh"') + 'partition = "gpu"\n'
    (project / "lenslab.toml").write_text(text)
    result = lenslab(project, "status")
    assert result.returncode == 2
    assert "box: partition is for a box whose runs go to a cluster's batch scheduler; ssh has none" in one_error_line(
        result.stderr
    )


def test_a_slurm_box_needs_a_login_node(project: Path) -> None:
    (project / "lenslab.toml").write_text('[box]\nname = "c"\nprovider = "slurm"\nuser = "lab"\n')
    result = lenslab(project, "up")
    assert result.returncode == 2
    assert "box: provider 'slurm' needs box.host" in one_error_line(result.stderr)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30", 1800), ("30:15", 1815), ("2:00:01", 7201), ("1-0", 86400), ("1-2:03", 93780), ("2-00:00:05", 172805),
     ("UNLIMITED", None), (None, None)],
)  # fmt: skip
def test_time_limit_seconds_reads_sbatch_formats(text: str | None, seconds: int | None) -> None:
    assert time_limit_seconds(text) == seconds


def test_cluster_facts_keep_only_clean_lines() -> None:
    """`status` prints what the login node says: a line with a control character, an unknown
    shape or a non-number where a number goes is left out, never printed or trusted."""
    out = "\n".join([
        "root_exists:yes", "root_used_kb:12", "disk_total_kb:1000", "disk_free_kb:lots", "uptime_s:77",
        "version:slurm-wlm 22.05.8",
        "partition:main* up 2 idle", "partition:evil\x1b[2J up 1 idle", "partition:short up",
        "node:c1 main* idle 4", "node:c2 main* down* 4", "node:c3\u202e main idle 4",
    ])  # fmt: skip
    facts = parse_facts(out, "/shared/x")
    assert (facts["root"], facts["root_exists"], facts["root_used_kb"], facts["uptime_s"]) == (
        "/shared/x",
        True,
        12,
        77,
    )
    assert (facts["disk_total_kb"], facts["disk_free_kb"]) == (1000, None)
    scheduler = facts["scheduler"]
    assert (scheduler["name"], scheduler["version"]) == ("Slurm", "22.05.8")
    assert scheduler["partitions"] == [
        {"name": "main", "default": True, "available": "up", "nodes": 2, "state": "idle"}
    ]
    assert [(n["name"], n["state"]) for n in scheduler["nodes"]] == [("c1", "idle"), ("c2", "down*")]


@pytest.mark.slow
def test_up_without_sources_to_install_is_one_line(slurm_cluster: SlurmCluster, keypair: Path, project: Path) -> None:
    """`up` installs lenslab from a checkout (build_context); a project that names none and is
    none is one line, and nothing is written to the shared root."""
    root = f"{slurm_cluster.shared_root}/nosrc-{uuid.uuid4().hex[:8]}"
    text = lenslab_toml(slurm_cluster, project).replace(f'root = "{slurm_cluster.shared_root}"', f'root = "{root}"')
    (project / "lenslab.toml").write_text(text.replace(f'build_context = "{project}"\n', ""))
    up = lenslab(project, "up")
    assert up.returncode == 2
    assert "box.build_context: `lenslab up` installs lenslab on the cluster's shared root" in one_error_line(up.stderr)
    assert not (slurm_cluster.host_shared / root.removeprefix("/shared/")).exists()


@pytest.mark.slow
def test_jupyter_runs_on_the_login_node_through_the_tunnel(slurm_project: Path) -> None:
    """`lenslab jupyter` starts JupyterLab on the login node (127.0.0.1 there) from the venv on
    the shared root, and tunnels a port of this machine to it; Jupyter's API answers the token."""
    import os
    import socket
    import threading
    import urllib.error
    import urllib.request

    from tests.support.slurm_cluster import LENSLAB

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "NO_COLOR": "1"}
    with subprocess.Popen([LENSLAB, "jupyter", "--port", str(port)], cwd=slurm_project, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env) as tunnel:  # fmt: skip
        try:
            assert tunnel.stdout is not None and tunnel.stderr is not None
            timer = threading.Timer(180, tunnel.kill)  # a hang must fail the test, not stall it
            timer.start()
            url = tunnel.stdout.readline().strip()
            timer.cancel()
            assert url.startswith(f"http://127.0.0.1:{port}/lab?token="), url or tunnel.stderr.read()
            token = url.split("token=", 1)[1]
            request = urllib.request.Request(f"http://127.0.0.1:{port}/api/status",
                                             headers={"Authorization": f"token {token}"})  # fmt: skip
            deadline, answer = time.monotonic() + 120, None
            while answer is None:
                try:
                    with urllib.request.urlopen(request, timeout=5) as response:
                        answer = json.loads(response.read())
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    assert time.monotonic() < deadline, "Jupyter on the login node did not answer"
                    time.sleep(0.5)
            assert "started" in answer
        finally:
            tunnel.terminate()
