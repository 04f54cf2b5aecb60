"""`lenslab pull`'s checks on what the box lists, on real run directories, through the local
provider's runner (the same pull code an SSH box goes through; the box is this machine).

Every refused pull is one line, and the destination's parent (with an earlier pull in it)
is byte-identical afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lenslab.remote.bootstrap import LocalRunner
from lenslab.remote.pull import Listing, PullFailed, choose_source, local_target, pull, source_files

RUN = "runs/tiny"


def _safetensors(values: int = 4) -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [values], "data_offsets": [0, 4 * values]}}).encode()
    return struct.pack("<Q", len(header)) + header + bytes(4 * values)


def write_final(run: Path) -> None:
    final = run / "final"
    final.mkdir(parents=True)
    (final / "cfg.json").write_text('{"d_in": 4}')
    (final / "sae_weights.safetensors").write_bytes(_safetensors())


def write_checkpoint(run: Path, step: int, files: dict[str, bytes] | None = None) -> Path:
    ckpt = run / "checkpoints" / f"step-{step:06d}"
    ckpt.mkdir(parents=True)
    files = files if files is not None else {"sae_weights.safetensors": _safetensors(), "cfg.json": b"{}"}
    entries = {}
    for name, data in files.items():
        (ckpt / name).write_bytes(data)
        entries[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / "manifest.json").write_text(json.dumps({"format": 1, "step": step, "files": entries}))
    return ckpt


def _digest(root: Path) -> dict[str, str]:
    out = {}
    for path in sorted(root.rglob("*")):
        kind = "l" if path.is_symlink() else "d" if path.is_dir() else "f"
        body = (
            hashlib.sha256(path.read_bytes()).hexdigest() if kind == "f" else os.readlink(path) if kind == "l" else ""
        )
        out[str(path.relative_to(root))] = f"{kind} {body}"
    return out


@pytest.fixture
def box(tmp_path: Path) -> Path:
    """The box's run directory (on this machine: the local provider)."""
    return tmp_path / "box" / RUN


@pytest.fixture
def laptop(tmp_path: Path) -> Path:
    """The laptop's project: an earlier pull of another run, and a file beside runs/."""
    project = tmp_path / "laptop"
    write_final(project / "runs" / "earlier")
    (project / "notes.txt").write_text("mine\n")
    return project


def test_final_is_pulled_and_replaces_an_earlier_copy(box: Path, laptop: Path) -> None:
    write_final(box)
    dest = laptop / "runs" / "tiny"
    (dest / "final").mkdir(parents=True)
    (dest / "final" / "stale.json").write_text("{}")
    local, what = pull(LocalRunner(), str(box), dest)
    assert (local, what) == (dest.resolve() / "final", "final")
    assert sorted(p.name for p in local.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    assert (local / "sae_weights.safetensors").read_bytes() == (box / "final" / "sae_weights.safetensors").read_bytes()
    assert sorted(p.name for p in dest.iterdir()) == ["final"]  # no .partial, no .old left


def test_the_newest_committed_checkpoint_wins(box: Path, laptop: Path) -> None:
    write_checkpoint(box, 5)
    write_checkpoint(box, 40)
    (box / "checkpoints" / ".tmp-step-000050-123").mkdir()  # an unfinished write: ignored
    (box / "checkpoints" / "step-000045").mkdir()  # no manifest yet: not committed
    local, what = pull(LocalRunner(), str(box), laptop / "runs" / "tiny")
    assert what == "checkpoints/step-000040"
    assert sorted(p.name for p in local.iterdir()) == ["cfg.json", "manifest.json", "sae_weights.safetensors"]


def _refused(box: Path, laptop: Path, says: str, dest: Path | None = None) -> None:
    before = _digest(laptop)
    with pytest.raises(PullFailed) as caught:
        pull(LocalRunner(), str(box), dest or laptop / "runs" / "tiny")
    assert says in str(caught.value)
    assert "\n" not in str(caught.value)
    assert _digest(laptop) == before


def test_a_checkpoint_name_with_a_newline_is_refused(box: Path, laptop: Path) -> None:
    write_checkpoint(box, 1)
    os.rename(box / "checkpoints" / "step-000001", box / "checkpoints" / "step-000009\n..")
    _refused(box, laptop, "the box lists 'checkpoints/step-000009\\n..' in")


def test_a_link_in_final_pointing_outside_is_refused(box: Path, laptop: Path, tmp_path: Path) -> None:
    write_final(box)
    secret = tmp_path / "box-secret"
    secret.write_text("x")
    (box / "final" / "extra.json").symlink_to(secret)
    _refused(box, laptop, "the box lists 'extra.json' in final, which is not a regular file")


def test_final_as_a_link_is_refused(box: Path, laptop: Path, tmp_path: Path) -> None:
    write_final(tmp_path / "elsewhere")
    box.mkdir(parents=True)
    (box / "final").symlink_to(tmp_path / "elsewhere" / "final")
    _refused(box, laptop, "the box lists 'final' in")


def test_a_nested_directory_is_refused(box: Path, laptop: Path) -> None:
    write_final(box)
    (box / "final" / "sub").mkdir()
    (box / "final" / "sub" / "x.json").write_text("{}")
    _refused(box, laptop, "'sub' in final, which is not a regular file")


def test_a_file_name_with_a_newline_is_refused(box: Path, laptop: Path) -> None:
    write_final(box)
    (box / "final" / "cfg.json\n..").write_text("{}")
    _refused(box, laptop, "'cfg.json\\n..' in final, which is not a simple file name")


def test_a_checkpoint_file_missing_from_its_manifest_is_refused(box: Path, laptop: Path) -> None:
    ckpt = write_checkpoint(box, 3)
    (ckpt / "extra.bin").write_bytes(b"x")
    _refused(box, laptop, "extra.bin is not in the checkpoint's manifest")


def test_a_manifest_naming_a_path_is_refused(box: Path, laptop: Path) -> None:
    ckpt = write_checkpoint(box, 3)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"]["../../notes.txt"] = {"bytes": 5, "sha256": "0" * 64}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    _refused(box, laptop, "manifest.json lists an odd entry '../../notes.txt'")


def test_a_manifest_of_the_wrong_shape_is_refused(box: Path, laptop: Path) -> None:
    ckpt = write_checkpoint(box, 3)
    (ckpt / "manifest.json").write_text("[1, 2]")
    _refused(box, laptop, "unreadable manifest.json (TypeError)")


def test_a_corrupt_file_leaves_the_earlier_pull_intact(box: Path, laptop: Path) -> None:
    write_checkpoint(box, 1)
    dest = laptop / "runs" / "tiny"
    pull(LocalRunner(), str(box), dest)
    ckpt = write_checkpoint(box, 2)
    (ckpt / "cfg.json").write_bytes(b"[]")  # same size, other bytes: fails its sha256
    _refused(box, laptop, "cfg.json fails its checksum after the copy")


def test_a_truncated_safetensors_in_final_is_refused(box: Path, laptop: Path) -> None:
    write_final(box)
    weights = box / "final" / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-3])
    _refused(box, laptop, "sae_weights.safetensors is truncated")


def test_a_destination_through_a_link_outside_is_refused(box: Path, laptop: Path, tmp_path: Path) -> None:
    write_checkpoint(box, 1)
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = laptop / "runs" / "tiny"
    dest.mkdir(parents=True)
    (dest / "checkpoints").symlink_to(outside)
    _refused(box, laptop, "checkpoints is a link or a file", dest)
    assert list(outside.iterdir()) == []


def test_a_destination_that_is_a_file_is_refused(box: Path, laptop: Path) -> None:
    write_final(box)
    _refused(box, laptop, "exists and is not a directory", laptop / "notes.txt")


def test_no_run_directory(box: Path, laptop: Path) -> None:
    _refused(box, laptop, "no run directory")


@pytest.mark.parametrize(
    ("listing", "says"),
    [
        (b"d 0 final\0f 5 final/../../x\0", "'../../x' in final, which is not a simple file name"),
        (b"d 0 final\0f 5 final//etc/passwd\0", "'/etc/passwd' in final, which is not a simple file name"),
        (b"d 0 final\0f 5 final/.bashrc\0", "'.bashrc' in final, which is not a simple file name"),
        (b"d 0 final\0f 5 final/..\0", "'..' in final"),
        (b"l 0 final\0", "'final' in /run, which is not a plain directory"),
        (b"d 0 checkpoints/step-1\nx\0f 1 checkpoints/step-1\nx/manifest.json\0", "'checkpoints/step-1\\nx' in /run"),
        (b"d 0 checkpoints/../../etc\0", "'checkpoints/..' in /run, which is not a checkpoint name"),
        (b"d 0 checkpoints/step-1\0f 1 checkpoints/step-1/manifest.json\0p 0 checkpoints/step-1/fifo\0", "fifo"),
        (b"d 0 final\0f 5 final/\xff.json\0".decode(errors="replace").encode(), "which is not a simple file name"),
        (b"d zero final\0", "unreadable listing entry"),
        (b"", "has no final SAE and no checkpoint yet"),
    ],
)
def test_crafted_listings_are_refused(listing: bytes, says: str) -> None:
    """Names exactly as a hostile box could print them (absolute, '..', newlines, links)."""
    with pytest.raises(PullFailed) as caught:
        parsed = Listing.parse(listing)
        source_files(parsed, choose_source(parsed, "/run"))
    assert says in str(caught.value)


def test_local_target_stays_inside_the_destination(tmp_path: Path) -> None:
    assert local_target(tmp_path / "d", "checkpoints/step-7") == tmp_path.resolve() / "d" / "checkpoints" / "step-7"
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "final.partial").symlink_to(tmp_path)
    with pytest.raises(PullFailed, match=r"final\.partial is a link or a file"):
        local_target(tmp_path / "d", "final")


STREAM_PROBE = textwrap.dedent(
    """
    import sys, tracemalloc
    from pathlib import Path
    from lenslab.remote.bootstrap import LocalRunner
    src, dst = sys.argv[1], Path(sys.argv[2])
    tracemalloc.start()
    LocalRunner().get(src, dst)
    LocalRunner().put(dst, src + ".back")
    print(tracemalloc.get_traced_memory()[1])
    """
)


def test_local_get_and_put_stream_with_bounded_memory(tmp_path: Path) -> None:
    size = 64 << 20
    src = tmp_path / "big.bin"
    with src.open("wb") as handle:
        handle.truncate(size)
    probe = subprocess.run(
        [sys.executable, "-c", STREAM_PROBE, str(src), str(tmp_path / "copy.bin")],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    peak = int(probe.stdout)
    assert peak < 8 << 20, f"peak {peak} bytes for a {size}-byte file"
    assert (tmp_path / "copy.bin").stat().st_size == size
    assert Path(str(src) + ".back").stat().st_size == size
