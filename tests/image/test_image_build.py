"""lenslab's image, built from the Dockerfile on a local Debian base with the CPU torch wheel,
then run for real: the tiny training run, the CLI, the HEALTHCHECK, the layer cache."""

from __future__ import annotations

import contextlib
import json
import secrets
import socket
import time
import urllib.request
from pathlib import Path

import docker
import docker.errors
import imagekit
import pytest
import tomli_w
import tomllib

pytestmark = pytest.mark.slow

IMAGE_CORPUS = "/opt/lenslab/src/workspace/configs/data/tiny-corpus.jsonl"
LAB_UID = 1000


def run(client: docker.DockerClient, containers: list[str], image: str, command: list[str], lab: Path,
        timeout: float = 300, read_only: bool = False) -> tuple[int, str]:
    """Run ``command`` in a container of ``image`` with ``lab`` as the persistent root; exit code, logs."""
    container = client.containers.run(image, command, detach=True, network_mode="host",
                                      volumes={str(lab): {"bind": "/lab", "mode": "ro" if read_only else "rw"}},
                                      labels={"lenslab.test": "image"})
    containers.append(container.id)
    result = container.wait(timeout=timeout)
    return int(result["StatusCode"]), container.logs().decode(errors="replace")


def test_tiny_training_run_finishes_in_the_image(client, containers, image, lab_root):
    run_file = tomllib.loads((imagekit.REPO / "workspace" / "configs" / "tiny.toml").read_text())
    run_file["training_tokens"] = 100_000
    run_file["dataset_path"] = IMAGE_CORPUS
    (lab_root / "workspace" / "tiny.toml").write_bytes(tomli_w.dumps(run_file).encode())

    # The image's working directory is the persistent root, so runs/ lands there by default.
    code, logs = run(client, containers, image.tag, ["lenslab-train", "workspace/tiny.toml"], lab_root, timeout=600)

    assert code == 0, logs[-3000:]
    weights = lab_root / "runs" / "tiny" / "final" / "sae_weights.safetensors"
    assert weights.is_file(), logs[-3000:]
    assert weights.stat().st_size > 0
    # Written by the non-root lab user, who owns the box's persistent root too.
    assert weights.stat().st_uid == LAB_UID


def test_image_runs_as_the_lab_user_on_the_persistent_root(client, containers, image, lab_root):
    command = ["sh", "-c", 'id -un; id -u; pwd; echo "$HF_HOME"; echo "$LENSLAB_ROOT"']
    code, logs = run(client, containers, image.tag, command, lab_root)

    assert code == 0, logs
    assert logs.split() == ["lab", str(LAB_UID), "/lab", "/lab/hf-cache", "/lab"]


def test_extra_ca_from_the_build_context_is_trusted(client, containers, image, lab_root):
    # The build reached the package index through this machine's TLS setup only because of it;
    # at run time too (pip, Hugging Face downloads) the image's system bundle must include it.
    host_certs = imagekit.host_ca_bundle().read_text().strip().split("-----END CERTIFICATE-----")
    last_cert = host_certs[-2].strip()
    command = ["cat", "/etc/ssl/certs/ca-certificates.crt"]
    code, logs = run(client, containers, image.tag, command, lab_root)

    assert code == 0, logs[-2000:]
    assert last_cert in logs


def test_lenslab_cli_answers_in_the_image(client, containers, image, lab_root):
    code, logs = run(client, containers, image.tag, ["lenslab", "--help"], lab_root)

    assert code == 0, logs
    assert "usage: lenslab" in logs


def test_default_command_serves_jupyterlab_on_loopback(client, containers, image, lab_root):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    token = secrets.token_hex(16)
    default = client.images.get(image.tag).attrs["Config"]["Cmd"]
    # Loopback only: Jupyter is reached through VSCode's forwarding or an SSH tunnel.
    assert "--ip=127.0.0.1" in default
    # The image's own command; only the port (8888 may be taken here) and the token are this test's.
    command = [*(arg for arg in default if not arg.startswith("--port=")), f"--port={port}",
               f"--IdentityProvider.token={token}"]
    container = client.containers.run(image.tag, command, detach=True, network_mode="host",
                                      volumes={str(lab_root): {"bind": "/lab", "mode": "rw"}},
                                      labels={"lenslab.test": "image"})
    containers.append(container.id)

    status, body = 0, b""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and status != 200:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=5) as resp:
                status, body = resp.status, resp.read()
        except OSError:
            container.reload()
            assert container.status == "running", container.logs().decode(errors="replace")[-2000:]
            time.sleep(1)
    assert status == 200, container.logs().decode(errors="replace")[-2000:]
    assert "started" in json.loads(body)


def test_healthcheck_passes_and_fails_on_a_read_only_root(client, containers, image, lab_root):
    health = client.images.get(image.tag).attrs["Config"]["Healthcheck"]
    assert health["Test"][0] == "CMD", health

    code, logs = run(client, containers, image.tag, health["Test"][1:], lab_root)
    assert code == 0, logs
    # The check must be able to fail: a persistent root the container cannot write is unhealthy.
    code, logs = run(client, containers, image.tag, health["Test"][1:], lab_root, read_only=True)
    assert code != 0
    assert "/lab is not writable" in logs

    # And Docker itself, running the image's check on its own schedule, reports healthy.
    container = client.containers.run(
        image.tag, ["sleep", "300"], detach=True, network_mode="host",
        volumes={str(lab_root): {"bind": "/lab", "mode": "rw"}}, labels={"lenslab.test": "image"},
        healthcheck={"test": health["Test"], "interval": 2_000_000_000, "timeout": 60_000_000_000, "retries": 1})
    containers.append(container.id)
    status = ""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and status not in ("healthy", "unhealthy"):
        time.sleep(1)
        container.reload()
        status = container.attrs["State"].get("Health", {}).get("Status", "")
    assert status == "healthy", container.attrs["State"].get("Health")


def test_python_only_edit_reuses_the_torch_layer(client, image, context, buildargs, tmp_path, capsys):
    edited = imagekit.clone_context(context, tmp_path / "edited")
    init = edited / "src" / "lenslab" / "__init__.py"
    text = init.read_text()
    init.unlink()  # a hard link: writing in place would change the cached context too
    init.write_text(text + "\n# edited by the layer-cache test\n")

    tag = f"{imagekit.IMAGE_REPO}:edited"
    try:
        rebuilt = imagekit.build(client, edited, tag, buildargs)
        assert rebuilt.step_cached(imagekit.TORCH_STEP), rebuilt.log[-3000:]
        assert rebuilt.step_cached("-r /opt/lenslab/requirements.txt"), rebuilt.log[-3000:]
        assert not rebuilt.step_cached(imagekit.SOURCE_STEP), rebuilt.log[-3000:]
        # Same layers up to the dependencies; only the source layers differ.
        before = client.images.get(image.tag).attrs["RootFS"]["Layers"]
        after = client.images.get(tag).attrs["RootFS"]["Layers"]
        assert len(before) == len(after)
        assert before[:-4] == after[:-4]
        assert before[-1] != after[-1]
        with capsys.disabled():
            first = "reused from an earlier run" if image.reused else f"{image.seconds:.0f} s"
            print(f"\nimage build: first {first}; after a Python-only edit {rebuilt.seconds:.0f} s")
    finally:
        with contextlib.suppress(docker.errors.ImageNotFound):
            client.images.remove(tag, force=True)
