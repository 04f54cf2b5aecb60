"""`lenslab eval` end to end: a real sshd box, the host's Docker Engine, lenslab's own image.

The run is the session's tiny run, copied into the box's persistent root (as a finished
`lenslab train` leaves it); `lenslab eval` runs lenslab-eval in the dev container and copies
eval/ back to ./runs/NAME/eval/.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.analysis.conftest import CORPUS, REPO

sys.path.insert(0, str(REPO / "tests" / "lenslab"))
from labkit import imagekit, persistent_root, remove_containers, start_box, write_lab_config
from lenslab_testkit import IMAGE, VM, free_port, lenslab, unique

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def docker_ready() -> None:
    if shutil.which("docker") is None or subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        pytest.fail("Docker Engine is not running; start it with: bash tests/services/start.sh")
    if subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True).returncode != 0:
        pytest.fail(f"test VM image {IMAGE} is missing; start the services with: bash tests/services/start.sh")


@pytest.fixture
def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, docker_ready: None) -> Iterator[dict[str, object]]:
    import docker as sdk

    from lenslab import sshconfig

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    key = Path(str(sshconfig.ensure_keypair()) + ".pub").read_text().strip()
    imagekit.ensure_base_image(sdk.from_env())
    context = imagekit.make_context(tmp_path / "context", imagekit.torch_wheel())
    box, root = unique("ev"), persistent_root(tmp_path / "persist")
    vm: VM = start_box(key, root)
    write_lab_config(project, vm, box, root, context, free_port())
    yield {"box": box, "root": root, "project": project}
    remove_containers(f"lenslab.box={box}")
    vm.stop()


def place_run(tiny_run: Path, root: Path, name: str) -> None:
    """The finished tiny run inside the persistent root, its dataset where the container sees it."""
    run = root / "runs" / name
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("eval", "data", "checkpoints"))
    (root / "workspace" / "data").mkdir(parents=True, exist_ok=True)
    shutil.copy(CORPUS, root / "workspace" / "data" / CORPUS.name)
    config = json.loads((run / "run-config.json").read_text())
    config["runner"]["dataset_path"] = f"/lab/workspace/data/{CORPUS.name}"
    (run / "run-config.json").write_text(json.dumps(config))
    for path in (run, *run.rglob("*")):  # the image's user (UID 1000) writes eval/ and data/ here
        path.chmod(0o777 if path.is_dir() else 0o666)


def test_lenslab_eval_runs_on_the_box_and_brings_the_report_back(
    lab: dict[str, object], tiny_run: Path, tmp_path: Path
) -> None:
    root, project = Path(str(lab["root"])), Path(str(lab["project"]))
    up = lenslab("up", timeout=1500)
    assert up.returncode == 0, up.stderr
    name = unique("run")
    place_run(tiny_run, root, name)

    opened = tmp_path / "opened.txt"
    browser = tmp_path / "browser.sh"
    browser.write_text(f'#!/bin/sh\necho "$1" > {opened}\n')
    browser.chmod(0o755)
    result = lenslab("eval", name, "--tokens", "4096", "--features", "8", "--open", "--json",
                     env={"BROWSER": str(browser)}, timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    local = project / "runs" / name / "eval"
    assert summary["path"] == str(local.resolve())
    assert summary["metrics"]["tokens_evaluated"] == 4096
    on_box = root / "runs" / name / "eval"
    names = sorted(p.name for p in on_box.iterdir())
    assert names == sorted(p.name for p in local.iterdir()) and "report.html" in names
    for file in names:
        assert (local / file).read_bytes() == (on_box / file).read_bytes(), file
    assert opened.read_text().strip() == (local / "report.html").resolve().as_uri()

    # A bad input on the box is one line here, with lenslab-eval's own words and exit 2.
    missing = lenslab("eval", "no-such-run")
    assert missing.returncode == 2
    assert missing.stderr.count("\n") == 1 and "unknown run" in missing.stderr, missing.stderr
    assert "Traceback" not in missing.stderr
    assert not (project / "runs" / "no-such-run").exists()
