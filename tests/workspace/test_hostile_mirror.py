"""A hostile or broken mirror: what it serves is data, never code, and never a path outside
the run; an unreachable one does not stop training until it has failed too often in a row."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from .conftest import merge, read_status, run_train, train_in_process, tree_digest, wait_for, write_run_file

# Each test launches lenslab-train on a trained run: seconds apiece, so not in the fast lane.
pytestmark = pytest.mark.slow

SHORT = {"training_tokens": 20_480, "resilience": {"checkpoint_every_tokens": 10_240}}


def short_run(mirror: Path) -> dict[str, Any]:
    return merge(SHORT, {"resilience": {"mirror": str(mirror)}})


class Payload:
    """Unpickling this creates ``marker``: the proof that a checkpoint ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A file:// mirror holding the checkpoints of one short run 't'."""
    tmp = tmp_path_factory.mktemp("mirrored")
    mirror = tmp / "mirror"
    run_file = write_run_file(tmp / "run.toml", short_run(mirror))
    result = run_train(run_file, tmp / "runs")
    assert result.returncode == 0, result.stderr
    assert (mirror / "t" / "latest").read_text() == "step-000000020"
    return mirror


@pytest.fixture
def box(tmp_path: Path, mirrored: Path) -> dict[str, Path]:
    """A new box: an empty runs directory, a copy of the mirror, a sentinel tree beside them."""
    mirror = tmp_path / "mirror"
    shutil.copytree(mirrored, mirror)
    sentinel = tmp_path / "sentinel"
    sentinel.mkdir()
    (sentinel / "keep.txt").write_text("do not touch")
    run_file = write_run_file(tmp_path / "run.toml", short_run(mirror))
    return {"root": tmp_path, "mirror": mirror, "sentinel": sentinel, "run_file": run_file, "runs": tmp_path / "runs"}


def rewrite_manifest(checkpoint: Path, change: Any) -> None:
    """Edit a mirrored checkpoint's manifest as an attacker would (checksums kept consistent)."""
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    change(manifest)
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


def plant(checkpoint: Path, name: str, content: bytes) -> None:
    (checkpoint / name).write_bytes(content)

    def update(manifest: dict[str, Any]) -> None:
        manifest["files"][name] = {"sha256": hashlib.sha256(content).hexdigest(), "bytes": len(content)}

    rewrite_manifest(checkpoint, update)


def outside_run(box: dict[str, Path]) -> dict[str, str]:
    """Everything under the test's directory except the run and the mirror (which the run updates)."""
    digest = tree_digest(box["root"])
    return {k: v for k, v in digest.items() if k != "runs" and not k.startswith(("runs/t", "mirror/"))}


def launch(box: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    return train_in_process([str(box["run_file"]), "--runs-dir", str(box["runs"])], capsys)


@pytest.mark.parametrize("file_name", ["trainer_state.pt", "lenslab_state.pt"])
def test_checkpoint_whose_pickle_runs_code_is_refused(
    box: dict[str, Path], file_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = box["root"] / "PWNED"
    checkpoint = box["mirror"] / "t" / "checkpoints" / "step-000000020"
    hostile = box["root"] / "hostile.pt"
    torch.save({"optimizer": Payload(marker)}, hostile)
    hostile_bytes = hostile.read_bytes()
    plant(checkpoint, file_name, hostile_bytes)
    hostile.unlink()
    before = outside_run(box)

    code, err = launch(box, capsys)

    assert not marker.exists(), "unpickling the checkpoint ran code"
    assert code == 0, err
    assert "Traceback" not in err
    assert "checkpoint step-000000020 refused: " in err
    assert f"{file_name} holds something other than tensors" in err
    assert "starting run 't' from scratch" in err
    assert outside_run(box) == before
    run_dir = box["runs"] / "t"
    assert_discarded(run_dir, hostile_bytes)
    assert (run_dir / "final" / "sae_weights.safetensors").exists()


def assert_discarded(run_dir: Path, hostile: bytes) -> None:
    """The refused download is gone: no copy of its bytes, no temporary directory left."""
    digest = hashlib.sha256(hostile).hexdigest()
    copies = [p for p in run_dir.rglob("*") if p.is_file() and hashlib.sha256(p.read_bytes()).hexdigest() == digest]
    assert copies == []
    assert [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp-")] == []


def test_mirror_checkpoint_of_another_config_is_refused_before_it_looks_committed(
    box: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """A mirror's newest checkpoint claims another config and carries a code-running state
    file: it is checked in its download directory and discarded, and the run starts over."""
    marker = box["root"] / "PWNED"
    mirrored_ckpt = box["mirror"] / "t" / "checkpoints" / "step-000000020"
    hostile = box["root"] / "hostile.pt"
    torch.save({"scaler": Payload(marker)}, hostile)
    hostile_bytes = hostile.read_bytes()
    hostile.unlink()
    plant(mirrored_ckpt, "lenslab_state.pt", hostile_bytes)
    rewrite_manifest(mirrored_ckpt, lambda manifest: manifest.update(config_hash="0000000000000000"))
    before = outside_run(box)

    code, err = launch(box, capsys)

    assert not marker.exists(), "unpickling the checkpoint ran code"
    assert code == 0, err
    assert "Traceback" not in err
    assert "checkpoint step-000000020 refused: it belongs to another config (hash 0000000000000000" in err
    assert "starting run 't' from scratch" in err
    assert outside_run(box) == before
    run_dir = box["runs"] / "t"
    assert_discarded(run_dir, hostile_bytes)
    manifest = json.loads((run_dir / "checkpoints" / "step-000000020" / "manifest.json").read_text())
    assert manifest["config_hash"] != "0000000000000000"  # this run's own checkpoint, not the mirror's
    assert (run_dir / "final" / "sae_weights.safetensors").exists()


@pytest.mark.parametrize(
    "pointer",
    ["../../../escape", "step-000000020/../../../escape", "/etc/passwd", "step-1\nstep-2", "", "x" * 200],
    ids=["dotdot", "step-then-dotdot", "absolute", "newline", "empty", "long"],
)
def test_latest_pointer_outside_the_checkpoints_is_refused(
    box: dict[str, Path], pointer: str, capsys: pytest.CaptureFixture[str]
) -> None:
    (box["mirror"] / "t" / "latest").write_text(pointer)
    before = outside_run(box)
    code, err = launch(box, capsys)
    assert code == 0, err
    assert "Traceback" not in err
    assert "ignoring the mirror's copy" in err
    assert "starting run 't' from scratch" in err
    assert outside_run(box) == before


@pytest.mark.parametrize(
    "name",
    ["../../../../escape.txt", "../escape.txt", "/tmp/lenslab-escape-test.txt", "sub/escape.txt", ".hidden"],
    ids=["dotdot-far", "dotdot", "absolute", "nested", "hidden"],
)
def test_manifest_naming_a_path_outside_the_checkpoint_is_refused(
    box: dict[str, Path], name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = box["mirror"] / "t" / "checkpoints" / "step-000000020"
    content = b"written where it must not be"

    def add(manifest: dict[str, Any]) -> None:
        manifest["files"][name] = {"sha256": hashlib.sha256(content).hexdigest(), "bytes": len(content)}

    rewrite_manifest(checkpoint, add)
    # Put the file where a naive download would read it from, so only the name check stops it.
    source = (checkpoint / name) if not name.startswith("/") else Path(name)
    if not name.startswith("/"):
        source.parent.mkdir(parents=True, exist_ok=True)
        source.write_bytes(content)
    before = outside_run(box)
    code, err = launch(box, capsys)
    assert code == 0, err
    assert "not a plain file name; refused" in err
    assert "starting run 't' from scratch" in err
    assert outside_run(box) == before
    assert not Path("/tmp/lenslab-escape-test.txt").exists()
    leftovers = [p for p in (box["runs"] / "t" / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    assert leftovers == []


def test_local_manifest_naming_dotdot_is_skipped(box: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """A local checkpoint may have come from a mirror too: the same rule applies."""
    (box["mirror"] / "t" / "latest").unlink()  # no mirror copy to fall back on
    local = box["runs"] / "t" / "checkpoints"
    local.parent.parent.mkdir()
    shutil.copytree(box["mirror"] / "t" / "checkpoints", local)

    def add(manifest: dict[str, Any]) -> None:
        manifest["files"]["../../sentinel/keep.txt"] = {"sha256": "0" * 64, "bytes": 12}

    rewrite_manifest(local / "step-000000020", add)
    code, err = launch(box, capsys)
    assert code == 0, err
    assert "skipping damaged checkpoint step-000000020: manifest names '../../sentinel/keep.txt'" in err
    assert "resuming from step-000000010" in err
    assert (box["sentinel"] / "keep.txt").read_text() == "do not touch"


class Outage:
    """A file:// mirror that becomes unwritable, even for root, once the run is training: its
    directory is replaced by a regular file; ``heal`` puts a directory back."""

    def __init__(self, root: Path) -> None:
        self.blocker = root / "blocked"
        self.blocker.mkdir()
        self.url = f"file://{self.blocker}/mirror"

    def block_when_running(self, run_dir: Path) -> None:
        wait_for(lambda: (read_status(run_dir) or {}).get("state") == "running", timeout=120, what="training")
        shutil.rmtree(self.blocker)
        self.blocker.write_text("a file where the mirror's directory should be")

    def heal(self) -> None:
        self.blocker.unlink()


def mirror_failures(run_dir: Path) -> int:
    status = read_status(run_dir) or {}
    return int((status.get("mirror") or {}).get("consecutive_failures", 0))


@pytest.mark.slow
def test_mirror_outage_does_not_stop_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    outage = Outage(tmp_path)
    run_file = write_run_file(
        tmp_path / "run.toml",
        {"resilience": {"mirror": outage.url, "mirror_retry_seconds": 0.05, "mirror_max_consecutive_failures": 1000}},
    )
    run_dir = tmp_path / "runs" / "t"
    seen: dict[str, Any] = {}

    def outage_then_recovery() -> None:
        outage.block_when_running(run_dir)
        wait_for(lambda: mirror_failures(run_dir) >= 2, timeout=120, what="mirror errors in status.json")
        seen["status"] = read_status(run_dir)
        outage.heal()

    helper = threading.Thread(target=outage_then_recovery, daemon=True)
    helper.start()
    code, err = train_in_process([str(run_file), "--runs-dir", str(tmp_path / "runs")], capsys)
    helper.join(timeout=5)

    assert code == 0, err
    assert seen["status"]["state"] == "running"
    assert "blocked" in seen["status"]["mirror"]["last_error"]
    log = (run_dir / "train.log").read_text()
    assert "mirror error (1 in a row, the run fails at 1000)" in log
    assert "the mirror works again" in log
    final_status = json.loads((run_dir / "status.json").read_text())
    assert final_status["state"] == "finished"
    assert final_status["mirror"]["consecutive_failures"] == 0
    latest = (outage.blocker / "mirror" / "t" / "latest").read_text()
    assert (outage.blocker / "mirror" / "t" / "checkpoints" / latest / "manifest.json").exists()


def test_mirror_failing_too_often_fails_the_run_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    outage = Outage(tmp_path)
    run_file = write_run_file(
        tmp_path / "run.toml",
        {"resilience": {"mirror": outage.url, "mirror_retry_seconds": 0.05, "mirror_max_consecutive_failures": 3}},
    )
    run_dir = tmp_path / "runs" / "t"
    threading.Thread(target=outage.block_when_running, args=(run_dir,), daemon=True).start()
    code, err = train_in_process([str(run_file), "--runs-dir", str(tmp_path / "runs")], capsys)
    assert code == 1, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"lenslab-train: error: mirror {outage.url}: 3 uploads in a row failed")
    assert "local checkpoints are intact" in line
    assert "Traceback" not in err
    log = (run_dir / "train.log").read_text()
    assert "mirror error (1 in a row, the run fails at 3)" in log
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and f"mirror {outage.url}" in status["message"]
    assert status["mirror"]["consecutive_failures"] == 3
    # Training went on through the failures, and stopped with a checkpoint.
    assert [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step-")]


def test_unreadable_mirror_at_launch_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A new box whose mirror cannot be read does not start from scratch (the mirror may hold
    the run's newer checkpoints): one line naming the mirror."""
    outage = Outage(tmp_path)
    shutil.rmtree(outage.blocker)
    outage.blocker.write_text("blocked")
    run_file = write_run_file(tmp_path / "run.toml", {"resilience": {"mirror": outage.url}})
    code, err = train_in_process([str(run_file), "--runs-dir", str(tmp_path / "runs")], capsys)
    assert code == 1
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"lenslab-train: error: mirror {outage.url}: cannot read ")
    assert "Traceback" not in err
    status = json.loads((tmp_path / "runs" / "t" / "status.json").read_text())
    assert status["state"] == "failed"
