"""The Lambda API emulator with real fresh-VM containers as its instances, for CLI tests.

All instances listen on one fixed SSH port (the address lenslab gets is always 127.0.0.1), and
a file system is a host directory, bind-mounted into each instance that has it, that outlives
them. ``api_url`` is what lenslab is pointed at: the emulator, or a flaky proxy in front of it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lenslab_testkit import VM, free_port, lenslab

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.support.lambda_emulator import LambdaEmulator

API_KEY = "lambda-secret-key-do-not-print-4242"


class Cloud:
    def __init__(self, emulator: LambdaEmulator, vm_factory: type[VM] | None) -> None:
        self.emulator = emulator
        self.api_url = emulator.url
        self.port = free_port()
        self.vms: dict[str, VM] = {}
        self.outputs: list[str] = []
        self.extra_volumes: list[str] = []  # "host:box" mounts every instance gets
        # False (always without a VM factory): instances get an address where nothing listens.
        self.boot_vms = vm_factory is not None
        self.authorized_key: str | None = None  # another key than lenslab's: the box refuses it
        emulator.on_launch = self._launch
        emulator.on_terminate = self._terminate
        self._factory = vm_factory

    def _launch(self, instance: dict[str, Any]) -> str:
        if not self.boot_vms or self._factory is None:
            return "127.0.0.1"
        volumes = []
        for name in instance["file_system_names"]:
            directory = self.emulator.fs_root / name
            directory.chmod(0o777)  # the VM's user owns nothing on the host
            volumes.append(f"{directory}:/lambda/nfs/{name}")
        vm = self._factory(authorized_key=self.authorized_key) if self.authorized_key else self._factory()
        vm.port, vm.volumes = self.port, volumes + self.extra_volumes
        self.vms[instance["id"]] = vm.start()
        return "127.0.0.1"

    def _terminate(self, instance: dict[str, Any]) -> None:
        vm = self.vms.pop(instance["id"], None)
        if vm is not None:
            vm.stop()

    def run(self, *args: str, timeout: float = 180) -> Any:
        result = lenslab(*args, env={"LAMBDA_API_KEY": API_KEY, "LAMBDA_API_URL": self.api_url}, timeout=timeout)
        self.outputs += [result.stdout, result.stderr]
        return result

    def launch_directly(self, name: str = "lenslab-gpu") -> str:
        """An instance launched through the API, as an earlier lenslab run would have."""
        from lenslab.providers.lambda_cloud.api import LambdaClient
        from lenslab.providers.lambda_cloud.launch import ensure_file_system, ensure_ssh_key

        public_key = (Path.home() / ".ssh" / "lenslab" / "id_ed25519.pub").read_text().strip()
        with LambdaClient(API_KEY, base_url=self.emulator.url) as api:
            ensure_ssh_key(api, "lenslab-gpu", public_key)
            ensure_file_system(api, "lenslab-proj", "us-east-1")
            return api.launch("us-east-1", "gpu_1x_a100_sxm4", "lenslab-gpu", ["lenslab-proj"], name)

    def launches(self) -> int:
        return sum(1 for method, path, _ in self.emulator.requests if path.endswith("/instance-operations/launch"))

    def forgotten(self, home: Path, box: str = "gpu") -> set[str]:
        """Instances lenslab does not know about: not the one in its launch record."""
        record = home / ".ssh" / "lenslab" / f"lambda-{box}.json"
        known = {json.loads(record.read_text())["instance_id"]} if record.exists() else set()
        return set(self.emulator.instances) - known


@contextmanager
def lambda_cloud(tmp_path: Path, vm_factory: type[VM] | None, project: Path, home: Path) -> Iterator[Cloud]:
    """A cloud and a lenslab.toml for box "gpu" (project "proj") in it. On the way out: no
    instance lenslab forgot, and the API key in nothing lenslab printed."""
    emulator = LambdaEmulator(tmp_path / "lambda-fs", api_key=API_KEY).start()
    emulator.launch_interval = 0.0
    cloud = Cloud(emulator, vm_factory)
    (project / "lenslab.toml").write_text(
        '[box]\nname = "gpu"\nprovider = "lambda"\nuser = "debian"\n'
        f'port = {cloud.port}\nproject = "proj"\ngpu_types = ["H100", "A100"]\nbudget_usd = 0.01\n'
    )
    try:
        yield cloud
        assert not cloud.forgotten(home), "instances lenslab launched but does not know about"
        assert not [text for text in cloud.outputs if API_KEY in text]
    finally:
        emulator.stop()
        for vm in cloud.vms.values():
            vm.stop()
