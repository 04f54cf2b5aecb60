"""``lenslab export skypilot``: the task SkyPilot's own loader reads, and a run that resumes exactly.

Managed jobs cannot run here: their controller is a cloud VM (or a Kubernetes pod) that must
reach public addresses, and tests reach only 127.0.0.1. So the exported task is checked in two
halves, each against the real thing:

- SkyPilot's own parser (``sky.Task.from_yaml``) reads it, and its resources, envs and secrets
  are what lenslab.toml says. SkyPilot pins click below 8.2, which the dev environment's wandb
  and huggingface_hub refuse, so it is installed (the ``skypilot`` extra of pyproject.toml) into
  an environment of its own under .cache/, made on first use; a small Lambda catalog in that
  process's HOME keeps SkyPilot from downloading its own.
- Its ``run`` command is executed as SkyPilot would on a machine of the job: bash, with the
  task's envs, the secrets' values and SKYPILOT_TASK_ID set, the file_mounts copied into a fresh
  HOME, against an S3-compatible server (moto) on loopback as the runs mirror. It trains
  workspace/configs/tiny.toml, is SIGKILLed mid-run, and runs again in a fresh HOME and working
  directory (a recovered managed job lands on a new machine, with the same SKYPILOT_TASK_ID):
  the final weights equal an uninterrupted run's. The task's ``setup`` (pip installs lenslab
  from the sources written beside the task) is not run: the dev environment's lenslab-train,
  which that setup would install, is on PATH instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomllib
import yaml

from lenslab.cli import main
from lenslab.export import skypilot as sky_export
from lenslab.export import yamltext

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "workspace" / "configs" / "tiny.toml"
BUCKET = "lab"
MIRROR = f"s3://{BUCKET}/runs"
S3_ENV = ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "FSSPEC_S3_ENDPOINT_URL"]
SECRET_VALUE = "not-in-the-task-3f1c"
# The catalog rows SkyPilot needs to check these clouds' resources offline (its CSV columns).
CATALOGS = {
    "lambda": """\
InstanceType,AcceleratorName,AcceleratorCount,vCPUs,MemoryGiB,Price,SpotPrice,Region,GpuInfo
gpu_1x_a100_sxm4,A100,1.0,30.0,200.0,1.29,,us-east-1,
gpu_1x_h100_pcie,H100,1.0,26.0,200.0,2.49,,us-east-1,
""",
    "runpod": """\
InstanceType,AcceleratorName,AcceleratorCount,vCPUs,MemoryGiB,Price,SpotPrice,Region,AvailabilityZone,GpuInfo
1x_H100_SECURE,H100,1.0,16.0,80.0,2.99,1.99,US,US-KS-2,
1x_A100-80GB_SECURE,A100-80GB,1.0,8.0,80.0,1.64,0.82,US,US-KS-2,
""",
}


def write_project(tmp_path: Path, **box: Any) -> Path:
    """A project with lenslab.toml (lambda, the runs mirror) and the tiny run beside it."""
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(TINY, project / "tiny.toml")
    shutil.copytree(TINY.parent / "data", project / "data")
    fields: dict[str, Any] = {
        "name": "sky",
        "provider": "lambda",
        "gpu_types": ["A100", "gpu_1x_h100_pcie"],
        "regions": ["us-east-1"],
        "build_context": str(REPO),
        "mirror": MIRROR,
        "mirror_env": S3_ENV,
        **box,
    }
    lines = [f"{key} = {json.dumps(value)}" for key, value in fields.items() if value is not None]
    (project / "lenslab.toml").write_text("[box]\n" + "\n".join(lines) + "\n")
    return project


def export(project: Path, *extra: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    argv = ["--config", str(project / "lenslab.toml"), "export", "skypilot", str(project / "tiny.toml"), *extra]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's usage errors
            code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()


def exported(project: Path, *extra: str) -> dict[str, Any]:
    code, _, err = export(project, "-o", str(project / "task.yaml"), *extra)
    assert code == 0, err
    task = yaml.safe_load((project / "task.yaml").read_text())
    assert isinstance(task, dict)
    return task


# ---- the task's text --------------------------------------------------------------------------


@pytest.mark.slow  # real processes, seconds each: kept out of the fast lane
def test_the_task_has_the_boxs_resources_and_no_secret_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in S3_ENV:
        monkeypatch.setenv(name, SECRET_VALUE)
    project = write_project(tmp_path)
    code, out, err = export(project, "-o", str(project / "task.yaml"))
    assert code == 0, err
    text = (project / "task.yaml").read_text()
    assert SECRET_VALUE not in text and SECRET_VALUE not in out
    assert f"sky jobs launch {project / 'task.yaml'}" + "".join(f" --secret {n}" for n in S3_ENV) in out
    task = yaml.safe_load(text)
    assert task["secrets"] == dict.fromkeys(S3_ENV)
    assert task["envs"] == {"LENSLAB_RUN_PREFIX": "tiny"}
    assert task["resources"] == {
        "cloud": "lambda",
        "disk_size": 64 + 5,
        "job_recovery": {"recover_on_exit_codes": [75]},
        "ordered": [
            {"accelerators": "A100:1", "region": "us-east-1", "use_spot": False},
            {"instance_type": "gpu_1x_h100_pcie", "region": "us-east-1", "use_spot": False},
        ],
    }
    sources = next(project.glob("lenslab-*.tar.gz"))
    assert task["file_mounts"] == {
        "~/.lenslab/lenslab-src.tar.gz": str(sources),
        "~/.lenslab/run/data/tiny-corpus.jsonl": str(project / "data" / "tiny-corpus.jsonl"),
    }
    with tarfile.open(sources) as tar:
        names = set(tar.getnames())
    assert {"pyproject.toml", "workspace/pyproject.toml", "src/lenslab/export/skypilot.py"} <= names
    assert not any(name.startswith((".venv", "runs/", ".git/")) for name in names)
    for script in (task["setup"], task["run"]):
        assert subprocess.run(["bash", "-n"], input=script, text=True, check=False).returncode == 0


@pytest.mark.slow  # builds the sources tarball: seconds
def test_spot_with_on_demand_fallback_orders_every_spot_candidate_first(tmp_path: Path) -> None:
    project = write_project(
        tmp_path,
        provider="runpod",
        interruptible=True,
        gpu_types=["H100", "A100"],
        regions=["us-east-1", "us-west-1"],
        min_free_gb=20,
    )
    resources = exported(project, "--gpus", "2")["resources"]
    assert resources["cloud"] == "runpod" and resources["disk_size"] == 84
    assert [(c["use_spot"], c["accelerators"], c["region"]) for c in resources["ordered"]] == [
        (spot, gpu, region)
        for spot in (True, False)
        for gpu in ("H100:2", "A100:2")
        for region in ("us-east-1", "us-west-1")
    ]


def test_one_candidate_is_written_flat(tmp_path: Path) -> None:
    project = write_project(
        tmp_path, provider="vast", gpu_types=["A100"], regions=None, interruptible=True, fallback="wait"
    )
    resources = exported(project)["resources"]
    assert resources == {
        "cloud": "vast",
        "disk_size": 69,
        "job_recovery": {"recover_on_exit_codes": [75]},
        "accelerators": "A100:1",
        "use_spot": True,
    }


def test_the_run_file_goes_in_with_the_mirror_and_a_name_from_the_task_id(tmp_path: Path) -> None:
    """The run script, run with a stand-in lenslab-train that prints its run file back."""
    project = write_project(tmp_path)
    task = exported(project)
    fake_bin, home = tmp_path / "bin", tmp_path / "machine"
    fake_bin.mkdir()
    home.mkdir()
    (fake_bin / "lenslab-train").write_text('#!/bin/sh\ncat "$1"; echo "runs-dir: $3"\n')
    (fake_bin / "lenslab-train").chmod(0o755)
    env = {"PATH": f"{fake_bin}:/usr/bin:/bin", "HOME": str(home), "SKYPILOT_TASK_ID": "sky-managed-x_job_7-0"}
    result = subprocess.run(["bash", "-c", task["run"]], env={**env, **task["envs"]}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    toml_text, runs_dir = result.stdout.rsplit("runs-dir: ", 1)
    written = tomllib.loads(toml_text)
    key = hashlib.sha256(b"sky-managed-x_job_7-0").hexdigest()[:12]
    original = tomllib.loads(TINY.read_text())
    assert written == {**original, "name": f"tiny-{key}", "resilience": {**original["resilience"], "mirror": MIRROR}}
    assert runs_dir.strip() == f"{home}/.lenslab/runs"
    assert f"lenslab: run tiny-{key} (SKYPILOT_TASK_ID=sky-managed-x_job_7-0)" in result.stderr
    missing = subprocess.run(["bash", "-c", task["run"]], env={**task["envs"], "PATH": env["PATH"]}, text=True,
                             capture_output=True)  # fmt: skip
    assert missing.returncode != 0 and "SKYPILOT_TASK_ID" in missing.stderr


@pytest.mark.parametrize(
    ("box", "needle"),
    [
        ({"mirror": None, "mirror_env": None}, "no runs mirror"),
        ({"mirror": "gs://bucket/runs"}, "not S3-compatible"),
        ({"provider": "ssh", "host": "127.0.0.1", "user": "debian", "gpu_types": None, "regions": None},
         "has no SkyPilot cloud"),
        ({"build_context": None}, "installs lenslab on the box from its sources"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, box: dict[str, Any], needle: str) -> None:
    project = write_project(tmp_path, **box)
    before = sorted(p.name for p in project.iterdir())
    code, out, err = export(project, "-o", str(project / "task.yaml"))
    assert code == 2 and out == ""
    assert err.startswith("lenslab: error: ") and err.count("\n") == 1 and needle in err, err
    assert sorted(p.name for p in project.iterdir()) == before


def test_a_run_file_holding_the_scripts_end_marker_is_refused(tmp_path: Path) -> None:
    from lenslab.errors import ConfigError
    from lenslab.runfile import RunFile

    text = f'name = "t"\nnotes = """\n{sky_export.HEREDOC_END}\n"""\n'
    with pytest.raises(ConfigError, match=sky_export.HEREDOC_END):
        sky_export.run_script(RunFile(tmp_path / "t.toml", "t", text, None), MIRROR)


def test_an_unknown_run_file_is_one_line(tmp_path: Path) -> None:
    project = write_project(tmp_path)
    (project / "tiny.toml").unlink()
    code, _, err = export(project)
    assert code == 2 and err.count("\n") == 1 and "tiny.toml" in err and "cannot read" in err, err
    assert not list(project.glob("*.yaml")) and not list(project.glob("*.tar.gz"))


@pytest.mark.parametrize(
    "text",
    [
        "plain\n",
        "tab\there\n  indented\n\n\ntrailing   \n",
        " leading space\n",
        "no final newline",
        "two final newlines\n\n",
        "cr\r\nlf\n",
        "unicode é ü 😀 \u2028 sep \x85 nel \x7f del \ufeff bom\n",
        '"quotes" and \\ backslash: {x} [y] # not a comment\n',
        "",
    ],
)
def test_yaml_text_reads_back_exactly(text: str) -> None:
    data = {"a": text, "list": [text, {"k": text, "n": 1}], "yes": True, "~/x y": None, "true": "null"}
    assert yaml.safe_load(yamltext.dump(data, header="a header\nof two lines")) == data  # type: ignore[arg-type]


# ---- SkyPilot's own loader --------------------------------------------------------------------


def skypilot_python() -> Path:
    """A venv with the ``skypilot`` extra's requirements, made once (under a lock) and reused."""
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["skypilot"]
    digest = hashlib.sha256(json.dumps([sys.version_info[:2], extra]).encode()).hexdigest()[:12]
    venv = REPO / ".cache" / f"skypilot-{digest}"
    python = venv / "bin" / "python"
    venv.parent.mkdir(exist_ok=True)
    with open(venv.parent / f"skypilot-{digest}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not python.exists():
            building = venv.with_name(venv.name + ".building")
            shutil.rmtree(building, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "venv", str(building)], check=True)
            subprocess.run(
                [building / "bin" / "pip", "install", "--quiet", "--disable-pip-version-check", *extra],
                check=True, timeout=600,
            )  # fmt: skip
            building.rename(venv)  # only a complete environment gets the name
    return python


PROBE = """
import json, sys
import sky, yaml

task = sky.Task.from_yaml(sys.argv[1])
with open(sys.argv[1]) as handle:
    config = yaml.safe_load(handle)
launched = sky.Task.from_yaml_config(config, secrets_overrides=[(n, "value") for n in config.get("secrets", {})])
print(json.dumps({
    "name": task.name,
    "envs": task.envs,
    "inline_secrets": sorted(task.secrets),
    "secret_refs": [ref.name for ref in task._managed_secret_refs],
    "launched_secrets": sorted(launched.secrets),
    "file_mounts": task.file_mounts,
    "setup": task.setup,
    "run": task.run,
    "resources": [
        {"cloud": str(r.cloud), "accelerators": r.accelerators, "instance_type": r.instance_type,
         "region": r.region, "use_spot": r.use_spot, "disk_size": r.disk_size, "job_recovery": r.job_recovery}
        for r in task.resources
    ],
}))
"""


LAMBDA_COMMON = {"cloud": "Lambda", "region": "us-east-1", "disk_size": 69, "use_spot": False}
RUNPOD_COMMON = {"cloud": "RunPod", "region": None, "disk_size": 69, "instance_type": None}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("box", "resources"),
    [
        (
            {},
            [
                {**LAMBDA_COMMON, "accelerators": {"A100": 1}, "instance_type": None},
                {**LAMBDA_COMMON, "accelerators": {"H100": 1}, "instance_type": "gpu_1x_h100_pcie"},
            ],
        ),
        (
            {"provider": "runpod", "interruptible": True, "gpu_types": ["H100", "A100-80GB"], "regions": None},
            [
                {**RUNPOD_COMMON, "accelerators": {gpu: 1}, "use_spot": spot}
                for spot in (True, False)
                for gpu in ("H100", "A100-80GB")
            ],
        ),
    ],
)
def test_skypilots_own_loader_reads_the_task(
    tmp_path: Path, box: dict[str, Any], resources: list[dict[str, Any]]
) -> None:
    python = skypilot_python()
    project = write_project(tmp_path, **box)
    task = exported(project)
    sky_home = tmp_path / "sky-home"
    for cloud, rows in CATALOGS.items():
        catalog = sky_home / ".sky" / "catalogs" / "v8" / cloud / "vms.csv"
        catalog.parent.mkdir(parents=True)
        catalog.write_text(rows)
    env = {"HOME": str(sky_home), "PATH": os.environ["PATH"], "SKYPILOT_DISABLE_USAGE_COLLECTION": "1"}
    probe = subprocess.run(
        [python, "-c", PROBE, str(project / "task.yaml")], env=env, capture_output=True, text=True, timeout=300
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
    seen = json.loads(probe.stdout.strip().splitlines()[-1])
    assert seen["name"] == "tiny"
    assert seen["envs"] == {"LENSLAB_RUN_PREFIX": "tiny"}
    # No value in the file: every secret is a reference that `--secret NAME` fills at launch.
    assert seen["inline_secrets"] == [] and seen["secret_refs"] == S3_ENV
    assert seen["launched_secrets"] == sorted(S3_ENV)
    assert seen["file_mounts"] == task["file_mounts"]
    assert (seen["setup"], seen["run"]) == (task["setup"], task["run"])
    recovery = {"recover_on_exit_codes": [75], "strategy": None}
    assert seen["resources"] == [{**r, "job_recovery": recovery} for r in resources]


# ---- the run command, killed and recovered on a new machine ------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def s3_mirror() -> Iterator[dict[str, str]]:
    """An S3-compatible server (moto) on loopback with an empty bucket; the secrets' values."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    secrets = dict(zip(S3_ENV, ["test", "test", "us-east-1", endpoint], strict=True))
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                 region_name="us-east-1").create_bucket(Bucket=BUCKET)  # fmt: skip
    yield secrets
    server.stop()


class Machine:
    """A machine of the managed job: ``home`` with the task's file_mounts copied in, a working
    directory of its own, and the task's envs, secrets and SKYPILOT_TASK_ID set."""

    def __init__(self, home: Path, task: dict[str, Any], secrets: dict[str, str], task_id: str) -> None:
        self.home = home
        self.home.mkdir(parents=True)
        for dest, source in task["file_mounts"].items():
            target = Path(dest.replace("~", str(self.home), 1))
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, target)
        self.cwd = Path(tempfile.mkdtemp(prefix="cwd-", dir=home.parent))
        self.env = {
            "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
            "HOME": str(self.home),
            **task["envs"],
            **secrets,
            "SKYPILOT_TASK_ID": task_id,
        }
        self.run_name = f"tiny-{hashlib.sha256(task_id.encode()).hexdigest()[:12]}"
        self.run_dir = self.home / ".lenslab" / "runs" / self.run_name
        self.log = self.cwd.with_suffix(".log")
        self.script = task["run"]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> subprocess.Popen[bytes]:
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                ["bash", "-c", self.script], cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        return self.proc

    def lose(self) -> None:
        """The machine is gone at once: every process of the job killed, its disk with it."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=60)
        shutil.rmtree(self.home)

    def weights(self) -> dict[str, Any]:
        from safetensors.torch import load_file

        return load_file(str(self.run_dir / "final" / "sae_weights.safetensors"))


@pytest.fixture
def machines() -> Iterator[list[Machine]]:
    """The machines a test started; whatever still runs at its end is killed."""
    started: list[Machine] = []
    yield started
    for machine in started:
        if machine.proc is not None and machine.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(machine.proc.pid, signal.SIGKILL)
            machine.proc.wait(timeout=60)


def mirrored_latest(secrets: dict[str, str], run_name: str) -> str | None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=secrets["FSSPEC_S3_ENDPOINT_URL"], aws_access_key_id="test",
                      aws_secret_access_key="test", region_name="us-east-1")  # fmt: skip
    try:
        return str(s3.get_object(Bucket=BUCKET, Key=f"runs/{run_name}/latest")["Body"].read().decode())
    except s3.exceptions.NoSuchKey:
        return None


@pytest.mark.slow
def test_the_run_command_resumes_exactly_from_the_mirror_on_a_new_machine(
    tmp_path: Path, s3_mirror: dict[str, str], machines: list[Machine]
) -> None:
    """A new machine of the job's cloud has the same home path (the image's user), empty: the
    run file and its dataset are where the first machine had them, and nothing else is."""
    project = write_project(tmp_path)
    task = exported(project)
    task_id = "sky-managed-2026-11-27-07-00-00-000000_tiny_3-0"

    reference = Machine(tmp_path / "reference" / "home", task, s3_mirror, "sky-managed-reference_tiny_1-0")
    machines.append(reference)
    assert reference.start().wait(timeout=900) == 0, reference.log.read_text()[-3000:]

    home = tmp_path / "job" / "home"
    first = Machine(home, task, s3_mirror, task_id)
    machines.append(first)
    proc = first.start()
    deadline = time.monotonic() + 600
    while mirrored_latest(s3_mirror, first.run_name) is None:
        assert proc.poll() is None, first.log.read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint reached the mirror"
        time.sleep(0.2)
    assert not (first.run_dir / "final").exists(), "it finished before the kill: nothing would be resumed"
    first.lose()  # SIGKILL: no signal handler runs, no final checkpoint is saved
    assert proc.returncode == -signal.SIGKILL
    killed_at = mirrored_latest(s3_mirror, first.run_name)

    second = Machine(home, task, s3_mirror, task_id)  # the recovered job, on a new machine
    machines.append(second)
    assert second.start().wait(timeout=900) == 0, second.log.read_text()[-3000:]
    log = second.log.read_text()
    assert f"lenslab: run {first.run_name} (SKYPILOT_TASK_ID={task_id})" in log
    assert f"restored checkpoint {killed_at} from mirror" in log, log[-3000:]
    assert "from scratch" not in log
    import torch

    final, expected = second.weights(), reference.weights()
    assert final.keys() == expected.keys()
    for key in expected:
        assert torch.equal(final[key], expected[key]), key
