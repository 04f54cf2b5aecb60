"""RunPod and vast.ai boxes whose instances are real containers.

The clouds' APIs are the stateful emulators on 127.0.0.1; each instance they boot runs as a
Docker container (``InstanceRunner``) with the image, command and environment lenslab asked
for, its volume directory at /lab and its SSH port published on 127.0.0.1. Until lenslab's box
image serves ``lenslab-box serve`` here, the test VM image stands in for it (its own sshd start,
user ``debian``, set in lenslab.toml); ``LENSLAB_BOX_IMAGE`` names a local image of lenslab's
that serves the contract itself, to run the same tests on it (user ``lab``, nothing adapted).
The launch is the provider's ``launch_offer`` on the cheapest matching offer, which is what
``lenslab up --cheapest --yes`` runs before it connects; everything else is the installed ``lenslab`` command.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from lenslab_testkit import IMAGE, LABEL, docker, lenslab

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.support.instance_runner import InstanceRunner, vm_adapter
from tests.support.runpod_emulator import RunPodEmulator
from tests.support.vast_emulator import VastEmulator

pytestmark = pytest.mark.slow
BOX_IMAGE = os.environ.get("LENSLAB_BOX_IMAGE")  # lenslab's own image, once it serves the contract


@dataclass
class Clouds:
    runpod: RunPodEmulator
    vast: VastEmulator
    runner: InstanceRunner

    def env(self) -> dict[str, str]:
        return {
            "RUNPOD_API_KEY": self.runpod.api_key,
            "RUNPOD_API_URL": self.runpod.graphql_url,
            "RUNPOD_REST_URL": self.runpod.rest_url,
            "VAST_API_KEY": self.vast.api_key,
            "VAST_API_URL": self.vast.url,
            "LAMBDA_API_KEY": "",
        }


@pytest.fixture
def clouds(docker_ready: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Clouds]:
    monkeypatch.chdir(tmp_path)  # restored after the test: init() changes into its project
    if BOX_IMAGE:
        runner = InstanceRunner(LABEL, images={"lenslab:latest": BOX_IMAGE})
    else:
        runner = InstanceRunner(LABEL, images={"lenslab:latest": IMAGE}, adapt=vm_adapter)
    runpod, vast = RunPodEmulator(tmp_path / "volumes"), VastEmulator(disk_root=tmp_path / "disks")
    runpod.runner = vast.runner = runner
    started = Clouds(runpod.start(), vast.start(), runner)
    for name, value in started.env().items():
        monkeypatch.setenv(name, value)
    yield started
    try:
        # After every test: no instance lenslab forgot, and no container behind one.
        assert not runpod.live_pods() and not vast.instances, "an instance was left behind"
        assert not runner.containers, "a container was left behind"
    finally:
        runner.close()
        runpod.stop()
        vast.stop()


def run(*args: str, cwd: Path) -> Any:
    result = lenslab(*args, env={"LENSLAB_CONFIG": str(cwd / "lenslab.toml")}, timeout=120)
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    return result


def init(tmp_path: Path, provider: str, *extra: str) -> Path:
    """`lenslab init`, then the fields this test needs (the test VM's user, the GPU)."""
    where = tmp_path / f"project-{provider}"
    where.mkdir()
    os.chdir(where)  # the clouds fixture's monkeypatch.chdir restores the directory afterwards
    result = lenslab("init", "--name", "t", "--provider", provider)
    assert result.returncode == 0, result.stderr
    with (where / "lenslab.toml").open("a") as toml:
        user = [] if BOX_IMAGE else ['user = "debian"']
        toml.write("\n".join([*user, 'gpu_types = ["4090"]', *extra]) + "\n")
    return where


def launch_cheapest(where: Path) -> Any:
    """What `lenslab up --cheapest --yes` does before it connects: the cheapest matching offer."""
    from lenslab import config
    from lenslab.cli.offers import cheapest_match
    from lenslab.providers.base import provider_for

    cfg = config.load(where / "lenslab.toml")
    provider = provider_for(cfg.box, assume_yes=True)
    return provider.launch_offer(cfg.box, cheapest_match(cfg.box, provider))


def cost_now(where: Path) -> Any:
    from lenslab import config
    from lenslab.providers.base import provider_for

    cfg = config.load(where / "lenslab.toml")
    provider = provider_for(cfg.box)
    assert provider.get(cfg.box) is not None
    return provider.cost(cfg.box.name)


def test_runpod_box_runs_commands_and_its_volume_outlives_the_pod(clouds: Clouds, tmp_path: Path) -> None:
    where = init(tmp_path, "runpod")
    offers = run("offers", "--gpu", "4090", "--json", cwd=where)
    rows = json.loads(offers.stdout)["offers"]
    assert any(r["provider"] == "runpod" and r["gpu_name"] == "RTX 4090" for r in rows), offers.stdout

    box = launch_cheapest(where)
    (pod,) = clouds.runpod.live_pods()
    user = "lab" if BOX_IMAGE else "debian"
    assert (box.user, box.host, box.port) == (user, "127.0.0.1", pod["runtime"]["ports"][0]["publicPort"])
    # The key `autostop = "box"` keeps on the volume: `down` removes it before the pod goes.
    key = "mkdir -p /lab/.lenslab && (umask 077 && echo k > /lab/.lenslab/runpod-api-key)"
    wrote = run("ssh", "--", "sh", "-c", f"{key} && echo kept > /lab/marker && id -un", cwd=where)
    assert (wrote.returncode, wrote.stdout) == (0, f"{user}\n"), wrote.stderr
    cost = cost_now(where)  # what `lenslab status` shows as $/h, hours and cost so far
    assert cost is not None and cost["price_per_hour_usd"] == 0.69 and cost["billed_hours"] is not None

    down = run("down", cwd=where)
    assert down.returncode == 0, down.stderr
    assert "the network volume stays" in down.stdout
    assert not clouds.runpod.live_pods() and not clouds.runner.containers
    (volume,) = clouds.runpod.volumes.values()
    assert (Path(volume["_directory"]) / "marker").read_text() == "kept\n"
    assert not (Path(volume["_directory"]) / ".lenslab" / "runpod-api-key").exists()

    launch_cheapest(where)  # a new pod, on the same volume
    (second,) = clouds.runpod.live_pods()
    assert second["id"] != pod["id"] and second["_volume"] == volume["id"]
    read = run("ssh", "--", "cat", "/lab/marker", cwd=where)
    assert (read.returncode, read.stdout) == (0, "kept\n"), read.stderr

    refused = run("down", "--purge", cwd=where)  # no terminal to say yes on: the volume stays
    assert refused.returncode == 5 and "network volume lenslab-t was not deleted" in refused.stderr
    assert not clouds.runpod.live_pods() and list(clouds.runpod.volumes) == [volume["id"]]
    purged = run("down", "--purge", "--yes", cwd=where)
    assert purged.returncode == 0 and "deleted network volume lenslab-t" in purged.stdout
    assert not clouds.runpod.volumes and not Path(volume["_directory"]).exists()


def test_vast_box_runs_commands_and_down_destroys_it(clouds: Clouds, tmp_path: Path) -> None:
    where = init(tmp_path, "vast", 'mirror = "s3://bucket/lenslab"')
    box = launch_cheapest(where)
    (row,) = clouds.vast.instances.values()
    assert (box.host, box.port) == ("127.0.0.1", int(row["ports"]["2222/tcp"][0]["HostPort"]))
    done = run("ssh", "--", "sh", "-c", "echo on-the-box > /lab/m && cat /lab/m", cwd=where)
    assert (done.returncode, done.stdout) == (0, "on-the-box\n"), done.stderr
    disk = tmp_path / "disks" / str(row["id"])
    assert (disk / "m").read_text() == "on-the-box\n"
    # The container was started with the contract's environment (an SSH login does not inherit it).
    env = docker("inspect", "-f", "{{json .Config.Env}}", clouds.runner.containers[str(row["id"])]).stdout
    assert {"LENSLAB_MIRROR=s3://bucket/lenslab", "LENSLAB_ROOT=/lab", "LENSLAB_BOX=t"} <= set(json.loads(env))
    down = run("down", cwd=where)
    assert down.returncode == 0, down.stderr
    assert not clouds.vast.instances and not clouds.runner.containers and not disk.exists()
