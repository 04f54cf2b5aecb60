"""Mirrors: a new box with an empty run directory continues from the mirrored checkpoint."""

from __future__ import annotations

import shutil
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import (
    assert_bit_identical,
    final_weights,
    run_train,
    start_train,
    wait_for_step,
    write_run_file,
)

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def s3_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An S3-compatible server (moto) on loopback, with one empty bucket."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    # The trainer subprocess inherits these: s3fs reads FSSPEC_S3_* as its options.
    for key, value in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "FSSPEC_S3_ENDPOINT_URL": endpoint,
        "AWS_ENDPOINT_URL": endpoint,
    }.items():
        monkeypatch.setenv(key, value)
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="lab")
    yield endpoint
    server.stop()


def new_box(run_dir: Path) -> None:
    """The machine is gone: its local run directory with it."""
    shutil.rmtree(run_dir)


def check_restores_from_mirror(tmp_path: Path, mirror: str, reference: dict[str, Any]) -> None:
    run_file = write_run_file(tmp_path / "run.toml", {"resilience": {"mirror": mirror}})
    runs, run_dir = tmp_path / "runs", tmp_path / "runs" / "t"
    proc = start_train(run_file, runs)
    wait_for_step(proc, run_dir, 45)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 75
    new_box(run_dir)

    result = run_train(run_file, runs)
    assert result.returncode == 0, result.stderr
    assert "restored checkpoint step-0000000" in result.stderr
    assert "starting run 't' from scratch" not in result.stderr
    assert_bit_identical(final_weights(run_dir), reference)


def test_restore_from_file_mirror(tmp_path: Path, reference_run: dict[str, Any]) -> None:
    mirror = tmp_path / "mirror"
    check_restores_from_mirror(tmp_path, f"file://{mirror}", reference_run)
    # Retention applies to the mirror too, and `latest` names a checkpoint that is there.
    names = sorted(p.name for p in (mirror / "t" / "checkpoints").iterdir())
    assert len(names) <= 3
    assert (mirror / "t" / "latest").read_text() in names


def test_restore_from_s3_mirror(tmp_path: Path, reference_run: dict[str, Any], s3_server: str) -> None:
    check_restores_from_mirror(tmp_path, "s3://lab/runs", reference_run)


def test_kill_mid_mirror_upload_keeps_previous_latest(tmp_path: Path, reference_run: dict[str, Any]) -> None:
    mirror = tmp_path / "mirror"
    run_file = write_run_file(tmp_path / "run.toml", {"resilience": {"mirror": f"file://{mirror}"}})
    runs, run_dir = tmp_path / "runs", tmp_path / "runs" / "t"
    crashed = run_train(run_file, runs, env={"LENSLAB_CRASH_POINT": "mirror-upload:3"})
    assert crashed.returncode == -9
    # The third upload was cut short: latest still names the checkpoint uploaded before it.
    # (Uploads run in the background and skip to the newest committed checkpoint, so which
    # steps were uploaded depends on timing; the order of events does not.)
    mirrored = sorted((mirror / "t" / "checkpoints").iterdir(), key=lambda p: p.name)
    assert len(mirrored) >= 3
    partial, latest = mirrored[-1], (mirror / "t" / "latest").read_text()
    assert latest == mirrored[-2].name
    assert len(list(partial.iterdir())) < len(list(mirrored[-2].iterdir()))
    new_box(run_dir)
    result = run_train(run_file, runs)
    assert result.returncode == 0, result.stderr
    assert f"restored checkpoint {latest} from mirror" in result.stderr
    assert_bit_identical(final_weights(run_dir), reference_run)


def test_unknown_mirror_scheme_is_one_line(tmp_path: Path) -> None:
    run_file = write_run_file(tmp_path / "run.toml", {"resilience": {"mirror": "nosuch://bucket/x"}})
    result = run_train(run_file, tmp_path / "runs")
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("lenslab-train: error: resilience.mirror 'nosuch://bucket/x': no filesystem for this URL")
    assert "Traceback" not in result.stderr


def test_an_older_local_checkpoint_yields_to_the_mirrors_newer_one(
    tmp_path: Path, reference_run: dict[str, Any]
) -> None:
    """A box that moved to another machine and back: its old volume still holds the checkpoints
    of before the move, while the mirror holds what the other machine trained since."""
    mirror = tmp_path / "mirror"
    run_file = write_run_file(tmp_path / "run.toml", {"resilience": {"mirror": f"file://{mirror}"}})
    runs, run_dir = tmp_path / "runs", tmp_path / "runs" / "t"
    old_volume = tmp_path / "old-volume"
    proc = start_train(run_file, runs)
    wait_for_step(proc, run_dir, 15)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 75
    shutil.copytree(run_dir, old_volume, symlinks=True)
    old_steps = sorted(p.name for p in (old_volume / "checkpoints").glob("step-*"))

    new_box(run_dir)  # the other machine trains on from the mirror
    proc = start_train(run_file, runs)
    wait_for_step(proc, run_dir, 45)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 75
    newer = (mirror / "t" / "latest").read_text()
    assert newer > old_steps[-1]

    shutil.rmtree(run_dir)  # back on the first machine, its old volume as it was left
    shutil.copytree(old_volume, run_dir, symlinks=True)
    result = run_train(run_file, runs)
    assert result.returncode == 0, result.stderr
    assert f"restored checkpoint {newer} from mirror" in result.stderr
    assert_bit_identical(final_weights(run_dir), reference_run)
