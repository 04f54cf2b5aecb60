"""The one-line errors of the container commands, and the laptop-side checks behind them."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from labkit import imagekit, tiny_run
from lenslab_testkit import free_port, lenslab

from lenslab.errors import ConfigError
from lenslab.remote import follow, pull


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

    monkeypatch.setitem(__import__("sys").modules, "lenslab_workspace.train.config", None)
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
    pull.verify_manifest(ckpt)
    (ckpt / "w.bin").write_bytes(b"abd")
    with pytest.raises(pull.PullFailed, match="fails its checksum"):
        pull.verify_manifest(ckpt)

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
