"""`lenslab offers` and `lenslab up --cheapest` against the Lambda, RunPod and vast.ai API
emulators on 127.0.0.1, through the installed `lenslab` command, as a user runs it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from lenslab_testkit import lenslab

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.support.lambda_emulator import LambdaEmulator
from tests.support.runpod_emulator import RunPodEmulator
from tests.support.vast_emulator import VastEmulator

KEY_VARS = ("LAMBDA_API_KEY", "RUNPOD_API_KEY", "VAST_API_KEY")


@dataclass
class Clouds:
    lam: LambdaEmulator
    runpod: RunPodEmulator
    vast: VastEmulator

    def env(self, **changes: str | None) -> dict[str, str]:
        env = {
            "LAMBDA_API_KEY": self.lam.api_key,
            "LAMBDA_API_URL": self.lam.url,
            "RUNPOD_API_KEY": self.runpod.api_key,
            "RUNPOD_API_URL": self.runpod.graphql_url,
            "RUNPOD_REST_URL": self.runpod.rest_url,
            "VAST_API_KEY": self.vast.api_key,
            "VAST_API_URL": self.vast.url,
        }
        for name, value in changes.items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        return env

    def api_keys(self) -> list[str]:
        return [self.lam.api_key, self.runpod.api_key, self.vast.api_key]


@pytest.fixture
def clouds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Clouds]:
    for name in KEY_VARS:  # only what a test sets reaches the command
        monkeypatch.delenv(name, raising=False)
    started = Clouds(
        LambdaEmulator(tmp_path / "fs").start(), RunPodEmulator(tmp_path / "volumes").start(), VastEmulator().start()
    )
    yield started
    # Nothing was rented: `offers` and a refused `up --cheapest` launch nothing.
    assert not started.lam.instances and not started.runpod.live_pods() and not started.vast.instances
    for emulator in (started.lam, started.runpod, started.vast):
        emulator.stop()


def run(clouds: Clouds, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> Any:
    full = {**(env if env is not None else clouds.env())}
    if cwd is not None:
        full["LENSLAB_CONFIG"] = str(cwd / "lenslab.toml")
    # Variables the test left out must not come from the parent's environment either.
    for name in KEY_VARS:
        full.setdefault(name, "")
    result = lenslab(*args, env=full, timeout=60)
    both = result.stdout + result.stderr
    assert "Traceback" not in both, both
    for key in clouds.api_keys():  # a key is never printed, whatever happened
        assert key not in both
    return result


def closed_port_url(path: str) -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}{path}"  # nothing listens there once the socket is closed


def per_gpu(rows: list[dict[str, Any]]) -> list[float]:
    return [r["price_per_gpu_hour"] for r in rows if r["price_per_gpu_hour"] is not None]


def test_offers_from_three_providers_in_one_table_cheapest_per_gpu_hour_first(clouds: Clouds) -> None:
    result = run(clouds, "offers", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert {p["provider"]: p["status"] for p in data["providers"]} == {"lambda": "ok", "runpod": "ok", "vast": "ok"}
    rows = data["offers"]
    prices = per_gpu(rows)
    assert prices == sorted(prices) and len(prices) >= 8
    assert all(r["price_per_gpu_hour"] is None for r in rows[len(prices) :])  # unpriced ones last
    cheapest = rows[0]
    assert (cheapest["provider"], cheapest["gpu_name"], cheapest["price_on_demand"]) == ("vast", "RTX 4090", 0.42)
    # A 2-GPU offer is ranked by its price per GPU: $2.36/h is $1.18 per GPU-hour.
    pair = next(r for r in rows if r["gpu_count"] == 2)
    assert pair["price_per_gpu_hour"] == pytest.approx(1.18)
    assert prices.index(1.18) < prices.index(1.25)
    lam = next(r for r in rows if r["provider"] == "lambda" and r["offer_id"] == "gpu_1x_a100_sxm4")
    assert (lam["region"], lam["vram_gb"], lam["price_interruptible"], lam["persistent_storage"]) == (
        "us-east-1", 40.0, None, True
    )  # fmt: skip
    assert next(r for r in rows if r["provider"] == "vast")["persistent_storage"] is False

    text = run(clouds, "offers")
    lines = text.stdout.splitlines()
    assert lines[0].split()[:3] == ["provider", "GPU", "count"]
    assert lines[1].split()[:4] == ["vast", "RTX", "4090", "1"]
    # The text table has the JSON's order.
    assert [line.split()[0] for line in lines[1 : len(rows) + 1]] == [r["provider"] for r in rows]


def test_filters_gpu_name_memory_and_interruptible(clouds: Clouds) -> None:
    rows = json.loads(run(clouds, "offers", "--gpu", "a100", "--min-vram", "60", "--json").stdout)["offers"]
    assert rows and all("A100" in r["gpu_name"] and r["vram_gb"] >= 60 for r in rows)
    assert {r["provider"] for r in rows} == {"runpod", "vast"}  # Lambda's A100 has 40 GB

    result = run(clouds, "offers", "--interruptible", "--json")
    rows = json.loads(result.stdout)["offers"]
    assert rows and all(r["price_interruptible"] is not None for r in rows)
    assert "lambda" not in {r["provider"] for r in rows}  # Lambda has no interruptible instances
    prices = per_gpu(rows)
    assert prices == sorted(prices) and prices[:2] == [0.18, 0.29]

    bad = run(clouds, "offers", "--min-vram", "lots")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "'lots' is not a number of GB" in bad.stderr


def test_a_provider_without_a_key_is_one_line_and_the_others_show(clouds: Clouds) -> None:
    result = run(clouds, "offers", env=clouds.env(RUNPOD_API_KEY=None))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    # The note goes to stderr: stdout holds only the table.
    note = "runpod: no key (set RUNPOD_API_KEY or write ~/.config/lenslab/runpod-api-key)"
    assert result.stderr.splitlines() == [note]
    assert lines[0].startswith("provider ") and not [line for line in lines if "no key" in line]
    assert not [line for line in lines if line.startswith("runpod ")]  # no runpod rows
    assert any(line.startswith("vast ") for line in lines) and any(line.startswith("lambda ") for line in lines)
    assert not [r for r in clouds.runpod.requests if r[0] == "POST"]  # RunPod was not asked


def test_a_key_file_must_be_private_and_works_when_it_is(clouds: Clouds, home: Path) -> None:
    key_file = home / ".config" / "lenslab" / "vast-api-key"
    key_file.parent.mkdir(parents=True)
    key_file.write_text(clouds.vast.api_key + "\n")
    key_file.chmod(0o644)
    result = run(clouds, "offers", env=clouds.env(VAST_API_KEY=None))
    assert result.returncode == 0
    assert f"vast: failed: {key_file}: readable by others (mode 644); run `chmod 600 {key_file}`" in result.stderr
    assert "failed" not in result.stdout
    key_file.chmod(0o600)
    data = json.loads(run(clouds, "offers", "--json", env=clouds.env(VAST_API_KEY=None)).stdout)
    assert {p["provider"]: p["status"] for p in data["providers"]}["vast"] == "ok"
    assert any(r["provider"] == "vast" for r in data["offers"])


@pytest.mark.slow  # waits out real timeouts or processes: seconds
def test_a_provider_that_is_down_is_one_line_while_the_others_answer(clouds: Clouds) -> None:
    start = time.monotonic()
    result = run(clouds, "offers", "--json", env=clouds.env(LAMBDA_API_URL=closed_port_url("/api/v1")))
    assert time.monotonic() - start < 20  # retried briefly, not for half a minute
    assert result.returncode == 0
    data = json.loads(result.stdout)
    status = {p["provider"]: p for p in data["providers"]}
    assert status["lambda"]["status"] == "failed"
    assert "Lambda Cloud API did not answer (ConnectError)" in status["lambda"]["error"]
    assert {r["provider"] for r in data["offers"]} == {"runpod", "vast"}

    text = run(clouds, "offers", env=clouds.env(VAST_API_URL=closed_port_url("/api/v0")))
    failed = [line for line in text.stderr.splitlines() if line.startswith("vast: failed: ")]
    assert len(failed) == 1 and "did not answer" in failed[0] and "failed" not in text.stdout


def test_an_invalid_key_is_one_line(clouds: Clouds) -> None:
    wrong = "rp-wrong-key-that-must-not-be-printed"
    result = run(clouds, "offers", env=clouds.env(RUNPOD_API_KEY=wrong))
    assert result.returncode == 0 and wrong not in result.stdout + result.stderr
    failed = [line for line in result.stderr.splitlines() if line.startswith("runpod: failed: ")]
    assert len(failed) == 1 and "key" in failed[0].lower()


def test_exit_code_is_non_zero_when_no_provider_answered(clouds: Clouds) -> None:
    result = run(clouds, "offers", env={})
    assert result.returncode == 5
    assert result.stdout == ""  # a pipe reading the table sees no table, not an error text
    assert result.stderr.splitlines()[0] == "no offers match"
    assert [line.split(":")[0] for line in result.stderr.splitlines()[1:]] == ["lambda", "runpod", "vast"]


# -- lenslab up --cheapest -------------------------------------------------------------------


def project(tmp_path: Path, provider: str, **fields: object) -> Path:
    directory = tmp_path / f"project-{provider}"
    directory.mkdir()
    lines = ["[box]", 'name = "t"', f'provider = "{provider}"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in fields.items()]
    (directory / "lenslab.toml").write_text("\n".join(lines) + "\n")
    return directory


def test_up_cheapest_shows_the_offer_and_a_budget_it_cannot_pay_refuses(clouds: Clouds, tmp_path: Path) -> None:
    where = project(tmp_path, "runpod", gpu_types=["A100", "4090"], budget_usd=0.5)
    result = run(clouds, "up", "--cheapest", "--yes", cwd=where)
    assert result.returncode == 5
    err = result.stderr.splitlines()
    assert err[0] == "lenslab: will launch 1x RTX 4090 (24 GB) on runpod at $0.69/hour"
    assert len(err) == 2 and err[1].startswith(
        "lenslab: error: box.budget_usd $0.50 has $0.50 left, less than one hour"
    )
    assert not clouds.runpod.volumes  # refused before anything was created
    # Without --yes and without a terminal to ask on: nothing launched, one line.
    asked = run(clouds, "up", "--cheapest", cwd=where)
    assert asked.returncode == 5 and asked.stderr.count("\n") == 1
    assert "not launched: lenslab would launch 1x RTX 4090 (24 GB) on runpod at $0.69/hour" in asked.stderr


def test_up_cheapest_honours_memory_price_and_gpu_types(clouds: Clouds, tmp_path: Path) -> None:
    where = project(tmp_path, "vast", gpu_types=["A100", "H100"], min_vram_gb=60, max_price_per_hour=2.2)
    result = run(clouds, "up", "--cheapest", "--yes", cwd=where)
    # The 2-GPU A100 offer is cheaper per GPU but $2.36/h is over the limit: the 1-GPU one wins.
    assert "lenslab: will launch 1x A100 SXM4 (82 GB) on vast in Sweden, SE at $1.25/hour" in result.stderr
    # Nothing outlives a vast.ai instance: without box.mirror, one line and nothing rented.
    assert result.returncode == 5 and "vast.ai keeps nothing after an instance is gone" in result.stderr
    (tmp_path / "tight").mkdir()
    tight = project(tmp_path / "tight", "vast", gpu_types=["H100"], max_price_per_hour=1.0)
    none = run(clouds, "up", "--cheapest", "--yes", cwd=tight)
    assert none.returncode == 5 and none.stderr.count("\n") == 1
    assert "no vast offer matches box.gpu_types ['H100'] (max_price_per_hour 1) right now" in none.stderr


def test_up_without_cheapest_on_a_container_cloud_refuses_in_one_line(clouds: Clouds, tmp_path: Path) -> None:
    result = run(clouds, "up", "--yes", cwd=project(tmp_path, "vast"))
    assert result.returncode == 5 and result.stderr.count("\n") == 1
    assert "set box.mirror in lenslab.toml" in result.stderr
    assert not [r for r in clouds.vast.requests if r[0] == "PUT"]


def test_up_cheapest_on_a_provider_without_offers_is_one_line(clouds: Clouds, tmp_path: Path) -> None:
    result = run(clouds, "up", "--cheapest", cwd=project(tmp_path, "local"))
    assert result.returncode == 5 and result.stderr.count("\n") == 1
    assert "provider local has no offers to choose from" in result.stderr


def test_cheapest_lambda_offer_is_the_instance_type_and_region_launched(clouds: Clouds, tmp_path: Path) -> None:
    from lenslab import config
    from lenslab.cli.offers import cheapest_match
    from lenslab.providers.lambda_cloud.api import LambdaClient
    from lenslab.providers.lambda_cloud.provider import LambdaProvider

    cfg = config.load(project(tmp_path, "lambda", gpu_types=["A100", "A10"]) / "lenslab.toml")
    with LambdaClient(clouds.lam.api_key, clouds.lam.url) as client:
        offer = cheapest_match(cfg.box, LambdaProvider(client=client))
    # A10 at $0.75 beats A100 at $1.29 (H100 has no capacity): gpu_types is a filter here.
    assert (offer.offer_id, offer.region, offer.price_on_demand) == ("gpu_1x_a10", "us-west-1", 0.75)


def test_offers_help_lists_the_filters() -> None:
    code = "from lenslab.cli import main; main(['offers', '--help'])"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ}, check=False
    )
    assert result.returncode == 0
    assert all(flag in result.stdout for flag in ("--gpu", "--min-vram", "--interruptible", "--json"))


# -- down and down --purge on a container cloud ------------------------------------------------


def test_down_terminates_every_pod_named_for_the_box_and_keeps_the_volume(clouds: Clouds, tmp_path: Path) -> None:
    from lenslab.providers.runpod.api import RunPodClient
    from lenslab.providers.runpod.records import PodSpec

    client = RunPodClient(clouds.runpod.api_key, clouds.runpod.graphql_url, clouds.runpod.rest_url)
    try:
        volume = client.create_network_volume("lenslab-t", 10, "EU-RO-1")
        for name in ("lenslab-t", "lenslab-t", "someone-else"):  # a second one left by a lost reply
            client.deploy(PodSpec(name=name, image_name="img", gpu_type_id="NVIDIA GeForce RTX 4090"))
        where = project(tmp_path, "runpod")
        status = json.loads(run(clouds, "status", "--json", cwd=where).stdout)
        assert status["reachable"] is False and len(status["instances"]) == 2  # both bill: both shown
        result = run(clouds, "down", cwd=where)
        assert result.returncode == 0, result.stderr
        assert "terminated the instance" in result.stdout and "the network volume stays" in result.stdout
        assert [p["name"] for p in clouds.runpod.live_pods()] == ["someone-else"]
        assert [v.id for v in client.network_volumes()] == [volume.id]
        client.terminate(clouds.runpod.live_pods()[0]["id"])
    finally:
        client.close()


def test_down_purge_deletes_the_network_volume_only_after_a_yes(clouds: Clouds, tmp_path: Path) -> None:
    from lenslab.providers.runpod.api import RunPodClient

    where = project(tmp_path, "runpod")
    with_volume = RunPodClient(clouds.runpod.api_key, clouds.runpod.graphql_url, clouds.runpod.rest_url)
    try:
        with_volume.create_network_volume("lenslab-t", 10, "EU-RO-1")
        refused = run(clouds, "down", "--purge", cwd=where)  # no terminal to ask on: a no
        assert refused.returncode == 5 and refused.stderr.count("\n") == 1
        assert "network volume lenslab-t was not deleted" in refused.stderr
        assert [v.name for v in with_volume.network_volumes()] == ["lenslab-t"]
        done = run(clouds, "down", "--purge", "--yes", cwd=where)
        assert done.returncode == 0 and "deleted network volume lenslab-t" in done.stdout
        assert with_volume.network_volumes() == []
    finally:
        with_volume.close()


def test_down_destroys_the_vast_instance_named_for_the_box(clouds: Clouds, tmp_path: Path) -> None:
    from lenslab.providers.vast.api import VastClient
    from lenslab.providers.vast.records import InstanceSpec

    client = VastClient(clouds.vast.api_key, clouds.vast.url)
    try:
        client.create_instance("5001", InstanceSpec(label="lenslab-t", image="img"), bid_price=0.2)
        result = run(clouds, "down", "--json", cwd=project(tmp_path, "vast"))
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["terminated"] is True
        assert client.instances() == []
    finally:
        client.close()
