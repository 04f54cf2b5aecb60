"""The dev container, through the real devcontainer CLI (the engine VSCode's extension uses):
it resolves from the repository root, and `devcontainer up` brings it up on the local engine."""

from __future__ import annotations

import json
import os
import re
import subprocess
import uuid
from pathlib import Path

import imagekit
import pytest

SOURCE = imagekit.REPO / "devcontainer" / "devcontainer.json"
DISCOVERED = imagekit.REPO / ".devcontainer" / "devcontainer.json"


def strip_jsonc(text: str) -> str:
    """devcontainer.json allows // comments; drop whole-line ones (the only kind used here)."""
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("//"))


def cli(binary: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 60) -> dict:
    proc = subprocess.run([str(binary), *args], capture_output=True, text=True, env=env, timeout=timeout, check=False)
    assert proc.returncode == 0, f"devcontainer {args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    # The result is the last JSON line on stdout; progress goes to stderr.
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_vscode_finds_the_same_config_as_the_source():
    # Dev Containers looks in .devcontainer/; the product keeps its config in devcontainer/.
    assert DISCOVERED.read_bytes() == SOURCE.read_bytes(), (
        "edit devcontainer/devcontainer.json, then: cp devcontainer/devcontainer.json .devcontainer/")


def test_read_configuration_resolves_from_the_repo_root(devcontainer_cli):
    out = cli(devcontainer_cli, "read-configuration", "--workspace-folder", str(imagekit.REPO))
    config = out["configuration"]
    config_dir = Path(config["configFilePath"]["fsPath"]).parent

    assert config_dir == imagekit.REPO / ".devcontainer"
    assert (config_dir / config["build"]["dockerfile"]).resolve() == imagekit.REPO / "Dockerfile"
    assert (config_dir / config["build"]["context"]).resolve() == imagekit.REPO
    assert config["hostRequirements"]["gpu"] == "optional"
    assert set(config["customizations"]["vscode"]["extensions"]) >= {"ms-python.python", "ms-toolsai.jupyter"}
    assert 8888 in config["forwardPorts"]
    assert config["mounts"] == [{"type": "bind", "source": f"{os.environ['HOME']}/lenslab", "target": "/lab"}]
    assert "runArgs" not in config and "privileged" not in config and "capAdd" not in config


def test_dev_container_user_is_the_image_user():
    config = json.loads(strip_jsonc(SOURCE.read_text()))
    dockerfile = (imagekit.REPO / "Dockerfile").read_text()
    image_user = re.search(r"^ARG USERNAME=(\S+)$", dockerfile, re.MULTILINE)
    assert image_user is not None
    assert config["remoteUser"] == config["containerUser"] == image_user.group(1)


@pytest.mark.slow
def test_devcontainer_up_and_exec(devcontainer_cli, client, image, context, buildargs, tmp_path):
    # `image` is requested so it is built first: the CLI's own build then finds every layer cached.
    # The product config, plus what this machine needs: the local base image and CPU torch wheel
    # (build args) and host networking (the only way out to the package index here).
    config = json.loads(strip_jsonc(SOURCE.read_text()))
    config["build"]["args"] = buildargs
    config["build"]["options"] = ["--network=host"]
    config["runArgs"] = ["--network=host"]
    workspace = imagekit.clone_context(context, tmp_path / "lenslab")
    (workspace / ".devcontainer").mkdir()
    (workspace / ".devcontainer" / "devcontainer.json").write_text(json.dumps(config, indent=2))
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home)}
    run_id = uuid.uuid4().hex[:12]
    ws = ["--workspace-folder", str(workspace), "--id-label", f"lenslab.test.devcontainer={run_id}"]

    # The CLI tags images of its own (vsc-<folder>-<hash>); the ones new after this test go again.
    vsc_before = {tag for img in client.images.list() for tag in img.tags if tag.startswith("vsc-")}
    container_id = ""
    try:
        up = cli(devcontainer_cli, "up", *ws, env=env, timeout=900)
        assert up["outcome"] == "success", up
        container_id = up["containerId"]
        # initializeCommand made the persistent root on the host before the bind mount needed it.
        root = home / "lenslab"
        subdirs = [root / sub for sub in ("workspace", "checkpoints", "hf-cache", "runs")]
        assert all(path.is_dir() for path in subdirs)
        # Made by this (root) test process; the container's UID 1000 user writes there too.
        for path in (root, *subdirs):
            path.chmod(0o777)

        probe = ("import os, sae_lens, lenslab_workspace, lenslab; "
                 "open('/lab/workspace/from-container', 'w').write('ok'); "
                 "print(os.getuid(), lenslab_workspace.__file__)")
        proc = subprocess.run([str(devcontainer_cli), "exec", *ws, "python", "-c", probe],
                              capture_output=True, text=True, env=env, timeout=120, check=False)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        uid, module = proc.stdout.strip().splitlines()[-1].split()
        assert uid == "1000"
        # The workspace's source shadows the installed copy, so edits in VSCode take effect at once.
        assert module.startswith("/workspaces/lenslab/workspace/"), module
        # The persistent root on the host is /lab in the container.
        assert (home / "lenslab" / "workspace" / "from-container").read_text() == "ok"
    finally:
        for container in client.containers.list(all=True, filters={"label": f"lenslab.test.devcontainer={run_id}"}):
            container.remove(force=True)
        # Only the tags go: the layers are shared with the image the other tests use.
        for img in client.images.list():
            for tag in img.tags:
                if tag.startswith("vsc-") and tag not in vsc_before:
                    client.images.remove(tag)
    assert container_id
