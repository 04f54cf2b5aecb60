"""Helpers for the container tests: a box whose persistent root the host engine can mount, the
image build context made the way the image tests make it, and a tiny run file.

The test VM uses the host's Docker socket, so the box's engine is this machine's engine: a
persistent root must exist at the same path in the VM and on the host, and containers started
"on the box" are visible to ``docker`` here.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lenslab_testkit import VM, docker

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "image"))
import imagekit  # noqa: E402  (tests/image is not a package)

TINY = REPO / "workspace" / "configs" / "tiny.toml"


def persistent_root(path: Path) -> Path:
    """A root the image's user (UID 1000) can write, whoever runs the tests."""
    for sub in ("", "workspace", "checkpoints", "hf-cache", "runs"):
        (path / sub).mkdir(parents=True, exist_ok=True)
        (path / sub).chmod(0o777)
    return path


def start_box(key: str, root: Path) -> VM:
    return VM(authorized_key=key, volumes=[f"{root}:{root}"]).start()


def write_lab_config(project: Path, vm: VM, box: str, root: Path, context: Path, jupyter_port: int) -> Path:
    args = {"BASE_IMAGE": imagekit.BASE_IMAGE, "TORCH_SPEC": imagekit.torch_spec(imagekit.torch_wheel())}
    text = "\n".join([
        "[box]", f'name = "{box}"', 'provider = "ssh"', 'host = "127.0.0.1"', 'user = "debian"',
        f"port = {vm.port}", f'root = "{root}"', 'gpu = "optional"', "min_free_gb = 0",
        'image = "lenslab-box-test:latest"', f'build_context = "{context}"', f"jupyter_port = {jupyter_port}",
        "build_args = { " + ", ".join(f'{k} = "{v}"' for k, v in args.items()) + " }",
    ])  # fmt: skip
    path = project / "lenslab.toml"
    path.write_text(text + "\n")
    return path


def tiny_run(dest: Path, training_tokens: int, checkpoint_every_tokens: int) -> Path:
    """tiny.toml, shortened, with its dataset next to it (as `lenslab train` uploads it)."""
    text = TINY.read_text()
    text = re.sub(r"^training_tokens = .*$", f"training_tokens = {training_tokens}", text, flags=re.M)
    text = text.replace("[resilience]\n", f"[resilience]\ncheckpoint_every_tokens = {checkpoint_every_tokens}\n")
    text = re.sub(r"^checkpoint_every_seconds = .*$", "checkpoint_every_seconds = 3600", text, flags=re.M)
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(TINY.parent / "data", dest / "data", dirs_exist_ok=True)
    path = dest / "run.toml"
    path.write_text(text)
    return path


def wait_for(what: str, check: Callable[[], Any], timeout: float, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def read_status(root: Path, run: str) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads((root / "runs" / run / "status.json").read_text())
        return data
    except (OSError, ValueError):
        return {}


def container_state(name: str) -> dict[str, Any]:
    out = docker("inspect", "-f", "{{json .State}}|{{.RestartCount}}", name, check=False)
    if out.returncode != 0:
        return {}
    state, restarts = out.stdout.strip().rsplit("|", 1)
    data: dict[str, Any] = json.loads(state)
    data["RestartCount"] = int(restarts)
    return data


def remove_containers(label: str) -> None:
    ids = docker("ps", "-aq", "--filter", f"label={label}", check=False).stdout.split()
    if ids:
        docker("rm", "-f", *ids, check=False)
