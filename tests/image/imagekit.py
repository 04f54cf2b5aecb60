"""Building lenslab's image in tests: the build context, the content key, the build itself.

No registry is reachable from CI, so the base image is a debootstrapped Debian bookworm
(tests/services/base-image.sh) and torch is the CPU wheel pip already resolves here, handed to
the build through the context's optional ``devcontainer/extras/`` folder. A built image is tagged with a hash
of everything that went into it and reused by later runs while that hash stays the same.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import os
import shutil
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import docker.errors
from docker.utils.build import exclude_paths

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "image-tests"
BASE_IMAGE = os.environ.get("LENSLAB_TEST_BASE_IMAGE", "lenslab-test-base:bookworm-1")
BASE_SCRIPT = REPO / "tests" / "services" / "base-image.sh"
IMAGE_REPO = "lenslab-test-image"
# Marks what these tests create, so a teardown removes exactly that and nothing else.
LABEL = "lenslab.test=image"
# The base image's Python: the wheel must be the one the image can install.
IMAGE_PYTHON = "3.11"
# The Dockerfile step that installs torch; its log line identifies the layer in a build log.
TORCH_STEP = "pip install --find-links /tmp/lenslab-wheels $TORCH_SPEC"
SOURCE_STEP = "pip install --no-deps --no-build-isolation"


def ensure_base_image(client: docker.DockerClient) -> str:
    """The base image's id, building it first when it is missing (a few minutes, once)."""
    try:
        return str(client.images.get(BASE_IMAGE).id)
    except docker.errors.ImageNotFound:
        pass
    proc = subprocess.run(["bash", str(BASE_SCRIPT)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{BASE_SCRIPT.name} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return str(client.images.get(BASE_IMAGE).id)


def torch_wheel() -> Path:
    """The CPU torch wheel of the torch this environment runs, fetched by pip into the cache."""
    version = importlib.metadata.version("torch")
    dest = CACHE / "wheels"
    found = sorted(dest.glob(f"torch-{version}-*.whl"))
    if found:
        return found[0]
    dest.mkdir(parents=True, exist_ok=True)
    abi = "cp" + IMAGE_PYTHON.replace(".", "")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest),
           "--python-version", IMAGE_PYTHON, "--implementation", "cp", "--abi", abi,
           "--platform", "manylinux_2_28_x86_64", f"torch=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    found = sorted(dest.glob(f"torch-{version}-*.whl"))
    if proc.returncode != 0 or not found:
        raise RuntimeError(f"pip download torch=={version} failed:\n{proc.stdout[-1500:]}{proc.stderr[-1500:]}")
    return found[0]


def torch_spec(wheel: Path) -> str:
    # The exact version of the wheel (e.g. 2.13.0+cpu): no index has it, so pip cannot swap in
    # the multi-GB CUDA build from PyPI.
    return f"torch=={wheel.name.split('-')[1]}"


def host_ca_bundle() -> Path:
    """The CA bundle this machine trusts, a TLS-inspecting proxy's CA included if it has one."""
    candidates = [os.environ.get("SSL_CERT_FILE"), ssl.get_default_verify_paths().cafile,
                  "/etc/ssl/certs/ca-certificates.crt"]
    for name in candidates:
        if name and Path(name).is_file():
            return Path(name)
    raise RuntimeError("no CA bundle found on this machine (set SSL_CERT_FILE)")


def make_context(dest: Path, wheel: Path) -> Path:
    """The repository as the Dockerfile sees it (per .dockerignore), plus the optional inputs."""
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    dest.mkdir(parents=True)
    for rel in sorted(exclude_paths(str(REPO), patterns)):
        src, dst = REPO / rel, dest / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            dst.symlink_to(os.readlink(src))
        elif src.is_dir():
            dst.mkdir(exist_ok=True)
        else:
            shutil.copy2(src, dst)
    extras = dest / "devcontainer" / "extras"
    try:
        os.link(wheel, extras / wheel.name)
    except OSError:  # another filesystem: copy the ~200 MB instead
        shutil.copy2(wheel, extras / wheel.name)
    shutil.copyfile(host_ca_bundle(), extras / "host-ca.crt")
    return dest


def clone_context(context: Path, dest: Path) -> Path:
    """A copy of a build context made of hard links: cheap, and the same bytes to the builder."""
    shutil.copytree(context, dest, symlinks=True, copy_function=os.link)
    return dest


def content_key(context: Path, buildargs: dict[str, str], base_id: str) -> str:
    """lenslab's own build-input hash (files, modes, contents, arguments) plus the base image's id,
    which the product's hash leaves to the tag of the base image."""
    from lenslab.remote.image import context_hash

    return hashlib.sha256(f"{base_id}\0{context_hash(context, buildargs)}".encode()).hexdigest()[:16]


@dataclass
class Build:
    tag: str
    image_id: str
    log: str
    seconds: float
    reused: bool  # the tag already existed: nothing was built

    def step_cached(self, needle: str) -> bool:
        """Whether the Dockerfile step whose text contains ``needle`` came from the layer cache."""
        steps = self.log.split("\nStep ")
        for step in steps:
            if needle in step.split("\n", 1)[0]:
                return " ---> Using cache" in step
        raise AssertionError(f"no step containing {needle!r} in the build log")


def build(client: docker.DockerClient, context: Path, tag: str, buildargs: dict[str, str]) -> Build:
    """Build with the engine's builder on the host network; a failure shows the step's last lines."""
    started = time.monotonic()
    lines: list[str] = []
    image_id = ""
    stream: Any = client.api.build(path=str(context), tag=tag, buildargs=buildargs, network_mode="host",
                                   rm=True, forcerm=True, decode=True, labels={"lenslab.test": "image"})
    for chunk in stream:
        if "stream" in chunk:
            lines.append(chunk["stream"])
        if "aux" in chunk and "ID" in chunk["aux"]:
            image_id = chunk["aux"]["ID"]
        if "error" in chunk:
            tail = "".join(lines)[-3000:]
            raise RuntimeError(f"image build failed: {chunk['error']}\n--- last lines ---\n{tail}")
    if not image_id:
        image_id = str(client.images.get(tag).id)
    return Build(tag, image_id, "".join(lines), time.monotonic() - started, reused=False)


def build_cached(client: docker.DockerClient, context: Path, buildargs: dict[str, str], base_id: str) -> Build:
    """The image for this context: reused when an image with the same content key exists."""
    tag = f"{IMAGE_REPO}:{content_key(context, buildargs, base_id)}"
    try:
        image = client.images.get(tag)
        return Build(tag, str(image.id), "", 0.0, reused=True)
    except docker.errors.ImageNotFound:
        pass
    return build(client, context, tag, buildargs)


# A stand-in for a provider's stock PyTorch image, made from lenslab's: python, torch, sae-lens
# and the other dependencies in the system Python, lenslab and lenslab-workspace not installed,
# and a start script that does what RunPod's stock images do (root's authorized_keys from
# PUBLIC_KEY, host keys made at start, sshd as root on port 22, then sleep).
STOCK_REPO = "lenslab-test-stock"
STOCK_START = """#!/bin/bash
set -e
if [ -n "$PUBLIC_KEY" ]; then
  install -d -m 700 /root/.ssh
  printf '%s\\n' "$PUBLIC_KEY" >> /root/.ssh/authorized_keys
  chmod 600 /root/.ssh/authorized_keys
  ssh-keygen -A >/dev/null
  mkdir -p /run/sshd
  /usr/sbin/sshd -p 22
fi
exec sleep infinity
"""
STOCK_DOCKERFILE = """FROM {base}
USER root
# The dependencies stay where they are and the system Python sees them (a .pth file), as a stock
# image's Python has torch; lenslab's own packages and sources go.
RUN set -eux; \\
    /opt/lenslab/venv/bin/pip uninstall -y lenslab lenslab-workspace; \\
    rm -rf /opt/lenslab/src /opt/lenslab/venv/bin/lenslab*; \\
    echo /opt/lenslab/venv/lib/python3.11/site-packages > /usr/lib/python3/dist-packages/stock-deps.pth; \\
    ! /usr/bin/python3 -c 'import lenslab'; \\
    /usr/bin/python3 -c 'import torch, sae_lens'
ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin VIRTUAL_ENV= LENSLAB_ROOT= HF_HOME=
COPY start.sh /start.sh
RUN chmod 755 /start.sh
WORKDIR /
EXPOSE 22
HEALTHCHECK NONE
CMD ["/start.sh"]
"""


def stock_image(client: docker.DockerClient, lenslab_tag: str, work: Path) -> str:
    """The stand-in stock image, derived from ``lenslab_tag`` (no download); reused while the
    same. Remove it after use (``remove_stock_image``): a child image left behind would stop
    the image tests from removing lenslab's older image."""
    dockerfile = STOCK_DOCKERFILE.format(base=lenslab_tag)
    key = hashlib.sha256(f"{lenslab_tag}\0{dockerfile}\0{STOCK_START}".encode()).hexdigest()[:16]
    tag = f"{STOCK_REPO}:{key}"
    try:
        client.images.get(tag)
        return tag
    except docker.errors.ImageNotFound:
        pass
    work.mkdir(parents=True, exist_ok=True)
    (work / "Dockerfile").write_text(dockerfile)
    (work / "start.sh").write_text(STOCK_START)
    build(client, work, tag, {})
    return tag


def remove_stock_image(client: docker.DockerClient, tag: str) -> None:
    with contextlib.suppress(docker.errors.ImageNotFound):
        client.images.remove(tag, noprune=False)
