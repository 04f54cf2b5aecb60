"""`image = "stock"`: RunPod and vast.ai launch the provider's stock PyTorch image with its own
start command (sshd as root on port 22, the box's key as PUBLIC_KEY), and the box is reached as
root on the public port mapped to 22. Against the stateful emulators, over real HTTP."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

from lenslab.providers.runpod.provider import RunPodProvider
from lenslab.providers.vast.provider import VastProvider
from lenslab.remote import stockbox
from tests.providers.test_container_launch import PUBLIC_KEY, box, gql_input, offer_4090, runpod_provider, vast_provider
from tests.support.runpod_emulator import RunPodEmulator
from tests.support.vast_emulator import VastEmulator


def test_runpod_launches_its_stock_image_with_its_own_start_and_sshd_on_22(runpod: RunPodEmulator, key: Path) -> None:
    provider, _ = runpod_provider(runpod)
    got = provider.launch_offer(box("runpod", key, image="stock"), offer_4090())
    sent = gql_input(runpod)
    assert (sent["imageName"], sent["dockerArgs"], sent["ports"]) == (RunPodProvider.stock_image, "", "22/tcp")
    env = {e["key"]: e["value"] for e in sent["env"]}
    assert env["PUBLIC_KEY"] == env["LENSLAB_PUBLIC_KEY"] == PUBLIC_KEY
    assert sent["volumeMountPath"] == "/lab"
    (pod,) = runpod.pods.values()
    assert (got.user, got.host, got.port, got.root) == ("root", "127.0.0.1", pod["_ssh"][1], "/lab")
    provider.terminate(got)


def test_vast_launches_the_pytorch_image_with_the_ssh_runtype(vast: VastEmulator, key: Path) -> None:
    provider = vast_provider(vast)
    got = provider.launch(box("vast", key, image="stock", mirror="s3://b/m", gpu_types=["4090"]))
    (row,) = vast.instances.values()
    body = row["_body"]
    assert (body["image"], body["runtype"], "args" in body) == (VastProvider.stock_image, "ssh_direc ssh_proxy", False)
    assert body["env"]["PUBLIC_KEY"] == PUBLIC_KEY and body["env"]["-p 22:22"] == "1"
    assert '"$PUBLIC_KEY" >> /root/.ssh/authorized_keys' in body["onstart"]
    assert (got.user, got.port) == ("root", row["_ssh"][1])
    provider.terminate(got)


def test_stock_on_a_box_that_is_no_container_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "lenslab.toml").write_text('[box]\nname = "x"\nprovider = "ssh"\nhost = "203.0.113.7"\n'
                                           'user = "u"\nimage = "stock"\n')  # fmt: skip
    lenslab = str(Path(sys.executable).with_name("lenslab"))
    result = subprocess.run([lenslab, "status"], cwd=tmp_path, capture_output=True, text=True, check=False)
    assert (result.returncode, result.stdout, result.stderr.count("\n")) == (2, "", 1)
    assert 'image = "stock" is for a provider whose instances are containers; not for ssh: name' in result.stderr
    assert result.stderr.rstrip().endswith("name lenslab's image instead (the default)")


def _context(tmp_path: Path) -> Path:
    context = tmp_path / "context"
    for rel in ("pyproject.toml", "README.md", "src/lenslab/a.py", "provision/x.sh", "workspace/pyproject.toml"):
        (context / rel).parent.mkdir(parents=True, exist_ok=True)
        (context / rel).write_text(rel)
    (context / "src" / "lenslab" / "provision").symlink_to("../../provision")
    return context


def test_the_stamp_follows_the_sources_and_the_tarball_holds_them(tmp_path: Path) -> None:
    context = _context(tmp_path)
    first = stockbox.stamp(context)
    (context / "src" / "lenslab" / "__pycache__").mkdir()
    (context / "src" / "lenslab" / "__pycache__" / "a.pyc").write_bytes(b"x")
    (context / "notes.txt").write_text("not a source")
    assert stockbox.stamp(context) == first  # caches and other files change nothing
    with tarfile.open(fileobj=io.BytesIO(stockbox.tarball(context)), mode="r:gz") as tar:
        names = {m.name: m for m in tar.getmembers()}
    assert sorted(names) == sorted(["pyproject.toml", "README.md", "src/lenslab/a.py", "src/lenslab/provision",
                                    "provision/x.sh", "workspace/pyproject.toml"])  # fmt: skip
    assert names["src/lenslab/provision"].issym()
    (context / "src" / "lenslab" / "a.py").write_text("changed")
    assert stockbox.stamp(context) != first  # a changed lenslab reinstalls
    assert json.dumps(first).startswith('"lenslab-')
