"""A real Slurm cluster for the tests: Debian's slurm-wlm (22.05) and munge in three unprivileged
containers on a Docker network made for it.

- ``ctl`` runs slurmctld and is the login node: sshd for the user ``lab`` on 127.0.0.1:<port>.
- ``c1`` and ``c2`` run slurmd.
- A host temporary directory is bind-mounted as ``/shared`` on every node (the cluster's shared
  file system); the persistent root is ``/shared/lenslab`` in it.

Every container is started with ``--init`` (slurmd's job steps leave zombies to reap), the
controller first. Each node gets a fixed address on the network and every name in /etc/hosts, so
a node that is killed and started again comes back at the same address under the same name.
The image is lenslab's Dockerfile up to its sources (Python, torch CPU, the dependencies: layers
shared with lenslab's image through the build cache) plus slurm-wlm and munge
(tests/services/slurm), tagged with a hash of its inputs and reused while that hash is the same.
"""

from __future__ import annotations

import ipaddress
import os
import random
import shutil
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "tests" / "services" / "slurm"
IMAGE_REPO = "lenslab-test-slurm"
LABEL_KEY = "lenslab.test.slurm"
NODES = ("c1", "c2")
USER = "lab"
SHARED_ROOT = "/shared/lenslab"
PARTITION = "main"
READY_SECONDS = 90.0


def docker(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=check, timeout=timeout)


def _imagekit() -> ModuleType:
    import importlib

    if str(REPO / "tests" / "image") not in sys.path:
        sys.path.insert(0, str(REPO / "tests" / "image"))  # tests/image is not a package
    return importlib.import_module("imagekit")


# lenslab's Dockerfile up to (not including) this line: the layers with Python, torch and the
# dependencies, without lenslab's sources.
SOURCE_STEP_MARK = "# The source last."
# The inputs of those layers, as the image tests' build context holds them (imagekit.make_context).
DEPENDENCY_FILES = ("pyproject.toml", "workspace/pyproject.toml")


def node_dockerfile() -> str:
    """lenslab's Dockerfile cut before its sources, then the Slurm part (tests/services/slurm)."""
    text = (REPO / "Dockerfile").read_text()
    if SOURCE_STEP_MARK not in text:
        raise RuntimeError(f"lenslab's Dockerfile has no {SOURCE_STEP_MARK!r} line to cut at")
    return text.split(SOURCE_STEP_MARK, 1)[0] + (RECIPE / "Dockerfile").read_text()


def node_context(dest: Path) -> Path:
    """The build context: what the dependency layers read (the same files as lenslab's image's
    context, so the build cache shares them), and the Slurm part."""
    kit = _imagekit()
    extras = dest / "devcontainer" / "extras"
    extras.mkdir(parents=True)
    for item in sorted((REPO / "devcontainer" / "extras").iterdir()):
        if item.is_file():
            shutil.copy2(item, extras / item.name)
    wheel = kit.torch_wheel()
    try:
        os.link(wheel, extras / wheel.name)
    except OSError:  # another filesystem: copy it
        shutil.copy2(wheel, extras / wheel.name)
    shutil.copyfile(kit.host_ca_bundle(), extras / "host-ca.crt")
    for name in DEPENDENCY_FILES:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, dest / name)
    (dest / "slurm").mkdir()
    shutil.copy2(RECIPE / "entrypoint.sh", dest / "slurm" / "entrypoint.sh")
    (dest / "Dockerfile").write_text(node_dockerfile())
    return dest


@dataclass
class ImageBuild:
    tag: str
    seconds: float
    reused: bool


def slurm_image(work: Path) -> ImageBuild:
    """The node image, tagged with a hash of its context, build arguments and base image: an edit
    to lenslab's sources is no new image (`lenslab up` installs those), a new dependency is."""
    import docker as sdk

    kit = _imagekit()
    started = time.monotonic()
    client = sdk.from_env()
    base_id = kit.ensure_base_image(client)
    context = node_context(work / "slurm-context")
    args = {"BASE_IMAGE": kit.BASE_IMAGE, "TORCH_SPEC": kit.torch_spec(kit.torch_wheel())}
    tag = f"{IMAGE_REPO}:{kit.content_key(context, args, base_id)}"
    reused = docker("image", "inspect", tag, check=False).returncode == 0
    if not reused:
        kit.build(client, context, tag, args)
    shutil.rmtree(context, ignore_errors=True)
    return ImageBuild(tag, time.monotonic() - started, reused)


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 for the cluster's network (retried on the rare collision with another cluster's)."""
    return ipaddress.IPv4Network(f"172.29.{random.randint(1, 254)}.0/24")


@dataclass
class SlurmCluster:
    """One controller/login node and two compute nodes; see the module docstring."""

    image: str
    authorized_key: str
    host_shared: Path  # the shared FS as the test host sees it (the bind mount's source)
    config_dir: Path  # slurm.conf and munge.key, mounted read-only on every node
    name: str = field(default_factory=lambda: f"lenslab-slurm-{uuid.uuid4().hex[:8]}")
    nodes: tuple[str, ...] = NODES
    user: str = USER
    shared_root: str = SHARED_ROOT
    partition: str = PARTITION
    login_port: int = 0
    addresses: dict[str, str] = field(default_factory=dict)

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> SlurmCluster:
        self._write_config()
        self._make_network()
        self._run("ctl", "ctl")
        for node in self.nodes:
            self._run(node, "node")
        self._wait_login()
        self.wait_idle(READY_SECONDS)
        return self

    def stop(self) -> None:
        for node in ("ctl", *self.nodes):
            docker("rm", "-f", "-v", self.container(node), check=False)
        docker("network", "rm", self.name, check=False)

    def container(self, node: str) -> str:
        return f"{self.name}-{node}"

    def _write_config(self) -> None:
        self.config_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy2(RECIPE / "slurm.conf", self.config_dir / "slurm.conf")
        (self.config_dir / "munge.key").write_bytes(os.urandom(1024))
        (self.config_dir / "munge.key").chmod(0o600)
        self.host_shared.mkdir(parents=True, exist_ok=True)
        self.host_shared.chmod(0o755)

    def _make_network(self) -> None:
        for _ in range(10):
            subnet = _free_subnet()
            made = docker("network", "create", "--label", LABEL_KEY, "--subnet", str(subnet), self.name, check=False)
            if made.returncode == 0:
                hosts = list(subnet.hosts())
                for i, node in enumerate(("ctl", *self.nodes)):
                    self.addresses[node] = str(hosts[9 + i])
                return
        raise RuntimeError(f"could not create the cluster's network: {made.stderr.strip()}")

    def _run(self, node: str, role: str) -> None:
        hosts = [arg for other, ip in self.addresses.items() for arg in ("--add-host", f"{other}:{ip}")]
        ports = ["-p", "127.0.0.1::22", "-e", f"AUTHORIZED_KEY={self.authorized_key}",
                 "-e", f"SHARED_ROOT={self.shared_root}"] if role == "ctl" else []  # fmt: skip
        docker(
            "run", "-d", "--init", "--name", self.container(node), "--hostname", node,
            "--label", LABEL_KEY, "--network", self.name, "--ip", self.addresses[node], *hosts, *ports,
            "-v", f"{self.host_shared}:/shared", "-v", f"{self.config_dir}:/cluster:ro",
            self.image, role,
        )  # fmt: skip

    def _wait_login(self) -> None:
        mapped = docker("port", self.container("ctl"), "22/tcp").stdout.split()
        self.login_port = int(mapped[0].rsplit(":", 1)[1])
        deadline = time.monotonic() + READY_SECONDS
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.login_port), timeout=1) as sock:
                    if sock.recv(64).startswith(b"SSH-2.0-"):
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the login node's sshd did not start:\n{self.logs('ctl')}")

    # ---- what the tests use ----------------------------------------------------------------
    def exec(self, node: str, cmd: list[str], user: str | None = None) -> subprocess.CompletedProcess[str]:
        """``cmd`` on ``node`` ("ctl", "c1", "c2") through docker exec (not checked)."""
        who = ["-u", user] if user else []
        return docker("exec", *who, self.container(node), *cmd, check=False)

    def kill_node(self, name: str) -> None:
        """Node loss: the compute node's container is killed (slurmd and every job step on it)."""
        docker("kill", self.container(name))

    def start_node(self, name: str) -> None:
        """The node boots again: same name and address; slurmd registers and returns to service."""
        docker("start", self.container(name))

    def node_states(self) -> dict[str, str]:
        out = self.exec("ctl", ["sinfo", "-h", "-N", "-o", "%N %T"]).stdout
        return dict(line.split(None, 1) for line in out.splitlines() if line.strip())

    def wait_idle(self, timeout: float = READY_SECONDS) -> None:
        """Until every compute node is idle (registered, nothing running)."""
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            states = self.node_states()
            if all(states.get(node) == "idle" for node in self.nodes):
                return
            time.sleep(0.5)
        raise RuntimeError(f"nodes not idle after {timeout:.0f}s: {states}\n{self.logs('ctl')}")

    def host_key_fingerprint(self) -> str:
        out = self.exec("ctl", ["ssh-keygen", "-lf", "/etc/ssh/ssh_host_ed25519_key.pub"]).stdout
        return out.split()[1]

    def logs(self, node: str) -> str:
        """The node's Slurm daemon log (for failure messages)."""
        name = "slurmctld" if node == "ctl" else "slurmd"
        out = self.exec(node, ["tail", "-n", "40", f"/var/log/slurm/{name}.log"])
        return f"--- {node} {name}.log ---\n{out.stdout}{out.stderr}"


# ---- lenslab against the cluster ---------------------------------------------------------------
LENSLAB = str(Path(sys.executable).with_name("lenslab"))
# What `lenslab up` builds lenslab from (lenslab.remote.stockbox.SOURCES), plus the Dockerfile
# that marks a build context.
SOURCE_NAMES = ("pyproject.toml", "README.md", "Dockerfile", "src", "provision", "workspace")


def snapshot_sources(dest: Path) -> Path:
    """A copy of this checkout's sources, taken once: an edit to the checkout while the tests run
    is no new lenslab (a second `up` must find the same stamp)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "runs", ".pytest_cache")
    for name in SOURCE_NAMES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, symlinks=True, ignore=ignore)
        else:
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def lenslab_toml(cluster: SlurmCluster, sources: Path, extra: str = "") -> str:
    """A project's lenslab.toml for the cluster's login node; ``extra`` lines go into [box]."""
    lines = [
        "[box]", 'name = "slurm"', 'provider = "slurm"', 'host = "127.0.0.1"', f"port = {cluster.login_port}",
        f'user = "{cluster.user}"', f'root = "{cluster.shared_root}"', f'build_context = "{sources}"',
        f'partition = "{cluster.partition}"', 'time_limit = "30"', extra,
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def lenslab(project: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """The real CLI in ``project`` (HOME as the test set it)."""
    return subprocess.run([LENSLAB, *args], cwd=project, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "NO_COLOR": "1"}, check=False)  # fmt: skip
