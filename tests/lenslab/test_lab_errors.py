"""The one-line errors of the container commands, and the laptop-side checks behind them."""

from __future__ import annotations

import json
import shutil
import struct
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from labkit import imagekit, tiny_run
from lenslab_testkit import IMAGE, LABEL, docker, free_port, lenslab

from lenslab.errors import ConfigError, LenslabError
from lenslab.remote import follow, pull


@pytest.mark.slow  # a fresh interpreter importing torch and sae-lens
def test_a_bad_run_file_is_one_line_and_nothing_is_uploaded(project: Path) -> None:
    # A box nobody listens on: validation must fail before any connection is tried.
    (project / "lenslab.toml").write_text(
        f'[box]\nname = "t"\nprovider = "ssh"\nhost = "127.0.0.1"\nuser = "debian"\nport = {free_port()}\n'
    )
    run = tiny_run(project / "run", training_tokens=1000, checkpoint_every_tokens=100)
    run.write_text(run.read_text().replace('architecture = "topk"', 'architecture = "nonsense"'))
    result = lenslab("train", str(run))
    assert result.returncode == 2
    assert result.stderr.startswith(f"lenslab: error: {run}: ") and result.stderr.count("\n") == 1
    assert "architecture" in result.stderr
    assert "Traceback" not in result.stderr


def test_light_check_without_the_workspace_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lenslab import runfile

    monkeypatch.setitem(__import__("sys").modules, "lenslab_workspace", None)  # as if not installed
    path = tmp_path / "run.toml"
    path.write_text('name = "x"\nmodel_name = "gpt2"\nhook_name = "h"\ndataset_path = "d"\ntraining_tokens = -1\n')
    with pytest.raises(ConfigError, match=r"field 'training_tokens': must be a positive integer, got -1$"):
        runfile.load(path)


def test_run_name_goes_into_the_uploaded_file_and_the_dataset_goes_with_it(tmp_path: Path) -> None:
    from lenslab import runfile

    run = runfile.load(tiny_run(tmp_path, 1000, 100), "other-name")
    files = run.files()
    assert set(files) == {"run.toml", "data/tiny-corpus.jsonl"}
    text = files["run.toml"].decode()
    assert 'name = "other-name"' in text and 'name = "tiny"' not in text


def test_log_lines_after_a_reconnect_are_not_printed_twice() -> None:
    printed: list[bytes] = []

    class Sink:
        def write(self, data: bytes) -> None:
            printed.append(data)

        def flush(self) -> None:
            pass

    f = follow.Follower(lambda: None, "r", out=Sink())  # type: ignore[arg-type,return-value]
    f._feed(b"2026-01-01T00:00:01.5Z a\n2026-01-01T00:00:02.000000001Z b\n")
    f._feed(b"2026-01-01T00:00:02.000000001Z b\n2026-01-01T00:00:03Z c\npart")
    f._feed(b"ial\n")
    assert b"".join(printed) == b"a\nb\nc\npartial\n"


def test_pull_verification_catches_a_damaged_copy(tmp_path: Path) -> None:
    ckpt = tmp_path / "step-1"
    ckpt.mkdir()
    (ckpt / "w.bin").write_bytes(b"abc")
    import hashlib

    manifest = {"format": 1, "files": {"w.bin": {"bytes": 3, "sha256": hashlib.sha256(b"abc").hexdigest()}}}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    pull.verify_manifest(ckpt, {"w.bin", "manifest.json"})
    (ckpt / "w.bin").write_bytes(b"abd")
    with pytest.raises(pull.PullFailed, match="fails its checksum"):
        pull.verify_manifest(ckpt, {"w.bin", "manifest.json"})

    final = tmp_path / "final"
    final.mkdir()
    (final / "cfg.json").write_text("{}")
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    (final / "sae_weights.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    pull.verify_final(final)
    (final / "sae_weights.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 2)
    with pytest.raises(pull.PullFailed, match="truncated"):
        pull.verify_final(final)


@pytest.mark.slow
def test_a_failing_build_names_the_step_and_its_last_lines(tmp_path: Path, docker_ready: None) -> None:
    import docker as sdk

    from lenslab.remote.engine import ImageBuildFailed
    from lenslab.remote.image import ensure_image

    client = sdk.from_env()
    imagekit.ensure_base_image(client)
    (tmp_path / "Dockerfile").write_text(
        f"FROM {imagekit.BASE_IMAGE}\nRUN echo preparing && echo 'E: Unable to locate package nope' && false\n"
    )
    with pytest.raises(ImageBuildFailed) as failed:
        ensure_image(client, tmp_path, f"lenslab-broken:{tmp_path.name.lower()}", {})
    assert str(failed.value).startswith("image build failed at Step 2/3 : RUN echo preparing")
    assert "(last lines: preparing | E: Unable to locate package nope)" in str(failed.value)
    assert str(failed.value).endswith("; fix that step, then run `lenslab up` again")
    assert "\n" not in str(failed.value)
    shutil.rmtree(tmp_path)


def test_engine_errors_become_one_line_with_the_fix() -> None:
    import docker.errors

    from lenslab.errors import DiskFull
    from lenslab.remote.engine import GPUNotVisible, translate_api_error

    full = translate_api_error(docker.errors.APIError("500", explanation="write /x: no space left on device"))
    assert isinstance(full, DiskFull) and "docker system prune" in str(full)
    gpu = translate_api_error(
        docker.errors.APIError("500", explanation='could not select device driver "" with capabilities: [[gpu]]')
    )
    assert isinstance(gpu, GPUNotVisible) and "nvidia-ctk runtime configure" in str(gpu)


def _status(name: str, **fields: object) -> str:
    return json.dumps({"name": name, "state": "running", "step": 3, "tokens_done": 10, "tokens_total": 100,
                       "started_at": 1.0, "last_checkpoint": None, **fields})  # fmt: skip


def test_run_listing_skips_what_is_not_a_run_and_keeps_text_to_one_line(tmp_path: Path) -> None:
    """A hostile or odd box: names with a newline, a status naming another run, junk in fields."""
    from lenslab.remote.bootstrap import LocalRunner
    from lenslab.remote.boxstate import statuses

    runs = tmp_path / "runs"
    entries = {
        "good": _status("good", state="running\n\x1b[2Jinjected", message="two\nlines"),
        "evil\nfake 1 2": _status("evil\nfake 1 2"),  # a name with a newline: not a run name
        "-rf": _status("-rf"),  # not a run name either (starts with "-")
        "other": _status("victim"),  # names another run
        "ghost\n": _status("ghost"),  # a trailing newline must not make it run "ghost"
        "junk": "{not json",
        "typed": _status("typed", step="3", tokens_done=True, started_at=float("nan"), tokens_total=10**400),
    }
    for name, text in entries.items():
        (runs / name).mkdir(parents=True)
        (runs / name / "status.json").write_text(text)
    found = statuses(LocalRunner(), str(runs), f"no-such-box-{free_port()}")
    assert [s["name"] for s in found] == ["good", "typed"]
    good, typed = found
    assert good["state"] == "unknown" and good["message"] == "two lines" and good["container"] is None
    assert typed["step"] is None and typed["tokens_done"] is None and typed["started_at"] is None
    assert typed["tokens_total"] is None


CONTAINER = {"state": "running", "exit_code": 0, "restarts": 0, "created": 100.0}


@pytest.mark.parametrize(
    ("status", "container", "shown"),
    [
        ({"state": "running", "started_at": 150.0}, CONTAINER, "running"),
        ({"state": "running", "started_at": 150.0}, None, "lost"),
        ({"state": "finished", "started_at": 150.0}, None, "finished"),
        # status.json from an earlier launch: this container has not reported in yet
        ({"state": "interrupted", "started_at": 50.0}, CONTAINER, "starting"),
        ({"state": "interrupted", "started_at": 50.0}, {**CONTAINER, "state": "exited", "exit_code": 143},
         "exited (143) before starting"),
        ({"state": "running", "started_at": 150.0}, {**CONTAINER, "state": "exited", "exit_code": 137},
         "exited (137)"),
        ({"state": "running", "started_at": 150.0}, {**CONTAINER, "state": "restarting", "exit_code": 1,
         "restarts": 3}, "restarting (exit 1, restarted 3x)"),
        ({"state": "running", "started_at": 150.0}, {**CONTAINER, "restarts": 2}, "running (restarted 2x)"),
        ({"state": "interrupted", "started_at": 150.0}, {**CONTAINER, "state": "exited", "exit_code": 75},
         "interrupted"),
    ],
)  # fmt: skip
def test_runs_state_column_trusts_the_container_over_status_json(
    status: dict[str, object], container: dict[str, object] | None, shown: str
) -> None:
    from lenslab.cli.train import run_state

    assert run_state({**status, "container": container}) == shown


def test_docker_times_parse_to_unix_seconds() -> None:
    from lenslab.remote.boxstate import docker_time

    assert docker_time("1970-01-01T00:01:40.5Z") == 100.5
    assert docker_time("2026-11-27T00:00:00.123456789Z") == pytest.approx(1795737600.123456789)
    assert docker_time("1970-01-01T00:01:40Z") == 100.0
    assert docker_time("yesterday") is None and docker_time(None) is None


class Launch:
    """A container standing in for a training container (same name, a real engine), and the
    root its trainer would write status.json to."""

    def __init__(self, root: Path) -> None:
        import docker as sdk

        from lenslab.remote.bootstrap import LocalRunner
        from lenslab.remote.lab import Lab

        self.run = f"t{uuid.uuid4().hex[:8]}"
        self.root = root
        self.status = root / "runs" / self.run / "status.json"
        self.status.parent.mkdir(parents=True)
        self.client = sdk.from_env()
        self.runner = LocalRunner()
        self.lab = Lab(f"box-{self.run}", str(root), IMAGE, False)

    def start(self, script: str, *extra: str) -> None:
        docker("run", "-d", "--name", f"lenslab-train-{self.run}", "--label", LABEL, "-v", f"{self.root}:{self.root}",
               *extra, IMAGE, "bash", "-c", script)  # fmt: skip

    def wait(self, timeout: float = 60) -> dict[str, object]:
        from lenslab.remote import training

        return training.wait_started(self.client, self.runner, self.lab, self.run, timeout)

    def remove(self) -> None:
        docker("rm", "-f", f"lenslab-train-{self.run}", check=False)
        self.client.close()


@pytest.fixture
def launch(tmp_path: Path, docker_ready: None) -> Iterator[Launch]:
    started = Launch(tmp_path / "root")
    yield started
    started.remove()


def test_a_launch_is_started_once_its_trainer_wrote_a_new_status(launch: Launch) -> None:
    # The previous launch's status, as `down` left it: it must not count for this one.
    launch.status.write_text(_status(launch.run, state="interrupted", started_at=time.time() - 600))
    record = f"{{'name': '{launch.run}', 'state': 'running', 'started_at': time.time()}}"
    write = f"import json, time; json.dump({record}, open('{launch.status}', 'w'))"
    launch.start(f'sleep 2; python3 -c "{write}"; sleep 60')
    status = launch.wait()
    assert status["state"] == "running" and status["name"] == launch.run


def test_a_container_that_exits_before_its_trainer_reports_in_is_a_failure_with_its_log(launch: Launch) -> None:
    from lenslab.remote.training import RunDidNotStart

    launch.status.write_text(_status(launch.run, state="interrupted", started_at=time.time() - 600))
    launch.start("echo importing torch; echo 'lenslab-train: error: no such hook' >&2; exit 2")
    with pytest.raises(RunDidNotStart) as caught:
        launch.wait()
    assert caught.value.message == (
        f"run {launch.run} did not start: its container exited with code 2 before the trainer wrote its status"
    )
    # stdout and stderr are two streams: their order in the log is not guaranteed.
    assert sorted(caught.value.tail) == ["importing torch", "lenslab-train: error: no such hook"]


def test_a_crash_loop_before_the_first_status_is_reported_and_stopped(launch: Launch) -> None:
    from lenslab.remote.training import RunDidNotStart

    launch.start("echo crashing; exit 1", "--restart", "on-failure:5")
    # Seen between two restarts or after the first exit: either way a failure.
    crashed = r"its container (crashed \(exit code 1, restarted [1-9]x\)|exited with code 1) before"
    with pytest.raises(RunDidNotStart, match=crashed):
        launch.wait()
    # Stopped, so that it neither spins nor blocks the next `lenslab train`.
    name = f"lenslab-train-{launch.run}"
    first = docker("inspect", "-f", "{{.State.Status}} {{.RestartCount}}", name).stdout.split()
    time.sleep(3)
    assert docker("inspect", "-f", "{{.State.Status}} {{.RestartCount}}", name).stdout.split() == first
    assert first[0] == "exited"


def test_a_trainer_that_stays_silent_past_the_deadline_is_reported(launch: Launch) -> None:
    from lenslab.remote.training import RunDidNotStart

    launch.start("echo still loading; sleep 60")
    with pytest.raises(RunDidNotStart, match=r"wrote no status within 3s \(its container is still running\)"):
        launch.wait(timeout=3)


def test_logs_of_a_run_without_a_container_print_its_log_file(tmp_path: Path) -> None:
    import io

    from lenslab.remote.bootstrap import LocalRunner
    from lenslab.remote.lab import Lab
    from lenslab.remote.labsession import LabSession

    session = LabSession(LocalRunner(), None, Lab("b", str(tmp_path), IMAGE, False))
    (tmp_path / "runs" / "r").mkdir(parents=True)
    (tmp_path / "runs" / "r" / "train.log").write_bytes(b"line 1\nline 2\n")
    out = io.BytesIO()
    follow.Follower(lambda: None, "r", out=out)._print_log_file(session)  # type: ignore[arg-type,return-value]
    assert out.getvalue() == b"line 1\nline 2\n"
    empty = io.BytesIO()
    # No container and no log file: no run of that name, said in one line (not an empty log).
    with pytest.raises(LenslabError, match="run gone has no container and no log file on the box"):
        follow.Follower(lambda: None, "gone", out=empty)._print_log_file(session)  # type: ignore[arg-type,return-value]
    assert empty.getvalue() == b""
