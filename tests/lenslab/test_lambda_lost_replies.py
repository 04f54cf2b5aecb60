"""`lenslab up/status/down` on a lambda box when replies are lost or wrong, or SSH fails: one
instance at most, none after `down`, and every failure after a launch says what still bills.

The cloud is the Lambda API emulator (behind a flaky proxy where replies get lost); instances
are real fresh-VM containers where the test needs a box, else an address where nothing listens.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from lambdakit import Cloud, lambda_cloud
from lenslab_testkit import VM

from tests.support.flaky_proxy import FlakyProxy

LAUNCH = "/api/v1/instance-operations/launch"
TERMINATE = "/api/v1/instance-operations/terminate"
BILLING = (
    "instance lenslab-gpu (gpu_1x_a100_sxm4 in us-east-1) is still running at $1.29/hour; `lenslab down` terminates it"
)
WARNING = "lenslab: warning: could not stop training on the box"
NOT_CHECKPOINTED = "training was not checkpointed; terminating the instance anyway"


@pytest.fixture
def cloud(tmp_path: Path, vm_factory: type[VM], project: Path, home: Path) -> Iterator[Cloud]:
    with lambda_cloud(tmp_path, vm_factory, project, home) as cloud:
        yield cloud


@pytest.fixture
def bare_cloud(tmp_path: Path, keypair: Path, project: Path, home: Path) -> Iterator[Cloud]:
    """No VMs: an instance's address has nothing listening (unless the test puts something there)."""
    with lambda_cloud(tmp_path, None, project, home) as cloud:
        yield cloud


@pytest.fixture
def proxy(cloud_of_test: Cloud) -> Iterator[FlakyProxy]:
    proxy = FlakyProxy(cloud_of_test.emulator.url).start()
    cloud_of_test.api_url = proxy.url
    yield proxy
    proxy.stop()


@pytest.fixture
def cloud_of_test(request: pytest.FixtureRequest) -> Cloud:
    name = "cloud" if "cloud" in request.fixturenames else "bare_cloud"
    cloud: Cloud = request.getfixturevalue(name)
    return cloud


def one_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


# -- replies of the wrong shape ------------------------------------------------------------

INSTANCE = {"id": "i1", "name": "lenslab-gpu", "status": "active", "ssh_key_names": [], "file_system_names": []}


@pytest.mark.parametrize(
    ("content_type", "body", "problem"),
    [
        ("text/html", b"<html><body>We'll be right back</body></html>", "the reply is not JSON (HTTP 200, text/html)"),
        ("application/json", b"null", 'unexpected reply (null instead of {"data": ...})'),
        ("application/json", b"[]", 'unexpected reply (a list instead of {"data": ...})'),
        ("application/json", b'{"data": {}}', "unexpected reply (data: input should be a valid list, got an object)"),
        (
            "application/json",
            json.dumps({"data": [{k: v for k, v in INSTANCE.items() if k != "id"}]}).encode(),
            "unexpected reply (data[0].id: missing)",
        ),
    ],
)
def test_a_reply_of_the_wrong_shape_is_one_line(
    bare_cloud: Cloud, proxy: FlakyProxy, content_type: str, body: bytes, problem: str
) -> None:
    proxy.fail("GET", "/api/v1/instances", "replace", times=3, content_type=content_type, body=body)
    for command in (("status",), ("down",), ("up", "--yes")):
        result = bare_cloud.run(*command)
        assert result.returncode == 5, result.stderr
        assert one_line(result.stderr) == (
            f"lenslab: error: Lambda Cloud API GET /instances: {problem}; Lambda Cloud may be having trouble, "
            "or LAMBDA_API_URL points at something else; try again later"
        )
    assert bare_cloud.launches() == 0


# -- failures after a launch ---------------------------------------------------------------


def test_a_failure_after_the_launch_says_what_bills_and_down_stops_it(bare_cloud: Cloud, home: Path) -> None:
    up = bare_cloud.run("up", "--yes", "--attempts", "1")
    assert up.returncode == 3
    line = one_line(up.stderr)
    assert line.startswith(f"lenslab: error: cannot reach 127.0.0.1:{bare_cloud.port} (connection refused)")
    assert line.endswith("; " + BILLING)
    (instance_id,) = bare_cloud.emulator.instances
    record = json.loads((home / ".ssh" / "lenslab" / "lambda-gpu.json").read_text())
    assert record["instance_id"] == instance_id and record["budget_usd"] == 0.01 and record["launched_at"] > 0

    down = bare_cloud.run("down")
    assert down.returncode == 0, down.stderr
    assert NOT_CHECKPOINTED in one_line(down.stderr)
    assert bare_cloud.emulator.instances == {}


def test_the_watcher_is_installed_before_bootstrap_can_fail(cloud: Cloud, project: Path) -> None:
    config = project / "lenslab.toml"
    config.write_text(config.read_text() + "min_free_gb = 100000\n")
    up = cloud.run("up", "--yes")
    assert up.returncode == 4
    assert one_line(up.stderr).endswith("; " + BILLING)
    (vm,) = cloud.vms.values()
    settings = json.loads(vm.exec("cat /etc/lenslab/autostop.json").stdout)
    assert settings["budget_usd"] == 0.01 and settings["action"] == "lambda-terminate"
    assert cloud.run("down").returncode == 0
    assert cloud.emulator.instances == {}


# -- lost replies --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "faults",
    [
        [("POST", "/api/v1/ssh-keys", "502"), ("POST", "/api/v1/filesystems", "reset"), ("POST", LAUNCH, "502")],
        [("POST", "/api/v1/filesystems", "502"), ("POST", LAUNCH, "reset"), ("GET", "/api/v1/instances/.+", "reset")],
    ],
)
def test_up_and_down_with_lost_replies(cloud: Cloud, proxy: FlakyProxy, faults: list[tuple[str, str, str]]) -> None:
    for method, path, how in faults:
        proxy.fail(method, path, how)  # type: ignore[arg-type]
    up = cloud.run("up", "--yes", "--no-containers")
    assert up.returncode == 0, up.stderr
    assert len(proxy.applied) == len(faults)
    assert len(cloud.emulator.instances) == 1 and cloud.launches() == 1
    assert len(cloud.emulator.file_systems) == 1 and len(cloud.emulator.ssh_keys) == 1

    proxy.fail("POST", TERMINATE, "502")
    proxy.fail("POST", TERMINATE, "reset")
    down = cloud.run("down")
    assert down.returncode == 0, down.stderr
    assert down.stdout.startswith("box gpu is down: terminated the instance")
    assert cloud.emulator.instances == {} and cloud.vms == {}


def test_purge_whose_reply_was_lost_still_deletes(bare_cloud: Cloud, proxy: FlakyProxy) -> None:
    bare_cloud.launch_directly()
    assert bare_cloud.run("down").returncode == 0
    proxy.fail("DELETE", "/api/v1/filesystems/.+", "502")
    purge = bare_cloud.run("down", "--purge", "--yes")
    assert purge.returncode == 0, purge.stderr
    assert purge.stdout.strip() == "box gpu is not running; nothing to stop; deleted file system lenslab-proj"
    assert bare_cloud.emulator.file_systems == {}


# -- every instance, in every state --------------------------------------------------------


def test_status_and_up_see_an_unhealthy_instance_and_down_terminates_all(bare_cloud: Cloud) -> None:
    sick = bare_cloud.launch_directly()
    booting = bare_cloud.launch_directly()
    bare_cloud.emulator.instances[sick]["status"] = "unhealthy"
    bare_cloud.emulator.instances[booting]["ip"] = None  # still booting: no address yet
    bare_cloud.emulator.stuck_booting = True

    status = bare_cloud.run("status")
    assert status.returncode == 3
    assert status.stdout.startswith("box gpu: unreachable: instance lenslab-gpu has no IP address yet; ")
    assert status.stdout.splitlines()[-1] == (
        f"  instances: {sick} unhealthy ($1.29/hour), {booting} booting ($1.29/hour); "
        "`lenslab down` terminates them all"
    )
    data = json.loads(bare_cloud.run("status", "--json").stdout)
    assert sorted(i["status"] for i in data["instances"]) == ["booting", "unhealthy"]

    down = bare_cloud.run("down")
    assert down.returncode == 0, down.stderr
    assert "instance lenslab-gpu has no IP address yet" in down.stderr and NOT_CHECKPOINTED in down.stderr
    assert bare_cloud.emulator.instances == {}


def test_up_terminates_an_unhealthy_instance_and_launches_one(bare_cloud: Cloud) -> None:
    sick = bare_cloud.launch_directly()
    bare_cloud.emulator.instances[sick]["status"] = "unhealthy"
    up = bare_cloud.run("up", "--yes", "--attempts", "1")
    assert up.returncode == 3  # nothing listens on the new instance
    assert f"lenslab: warning: terminating instance lenslab-gpu ({sick}, unhealthy)" in up.stderr
    assert sick not in bare_cloud.emulator.instances and len(bare_cloud.emulator.instances) == 1
    assert bare_cloud.run("down").returncode == 0
    assert bare_cloud.emulator.instances == {}


# -- down when SSH fails -------------------------------------------------------------------


class NotSSH:
    """Something on the box's SSH port that is not an SSH server: every session fails."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_server(("127.0.0.1", port))
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            conn.close()

    def close(self) -> None:
        self.sock.close()


def test_down_terminates_when_the_box_is_unreachable(bare_cloud: Cloud) -> None:
    bare_cloud.launch_directly()
    down = bare_cloud.run("down")
    assert down.returncode == 0, down.stderr
    assert one_line(down.stderr) == (
        "lenslab: warning: could not stop training on the box (cannot reach 127.0.0.1:"
        f"{bare_cloud.port} (connection refused); check box.host and box.port in lenslab.toml and that the box "
        f"is running): {NOT_CHECKPOINTED}"
    )
    assert down.stdout.startswith("box gpu is down: terminated the instance, stopped 0 container(s)")
    assert bare_cloud.emulator.instances == {}


def test_down_terminates_when_the_ssh_session_fails(bare_cloud: Cloud) -> None:
    bare_cloud.launch_directly()
    server = NotSSH(bare_cloud.port)
    try:
        down = bare_cloud.run("down")
    finally:
        server.close()
    assert down.returncode == 0, down.stderr
    line = one_line(down.stderr)
    assert line.startswith(f"{WARNING} (SSH session with debian@127.0.0.1:{bare_cloud.port} failed")
    assert line.endswith(NOT_CHECKPOINTED)
    assert bare_cloud.emulator.instances == {}


def test_down_terminates_when_the_box_refuses_the_key(cloud: Cloud) -> None:
    cloud.authorized_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHh0ZXN0a2V5 someone-else"
    cloud.launch_directly()
    down = cloud.run("down")
    assert down.returncode == 0, down.stderr
    line = one_line(down.stderr)
    assert line.startswith(f"{WARNING} (debian@127.0.0.1:{cloud.port} refused key")
    assert line.endswith(NOT_CHECKPOINTED)
    assert cloud.emulator.instances == {} and cloud.vms == {}


def test_down_terminates_when_the_host_key_changed(cloud: Cloud, home: Path, tmp_path: Path) -> None:
    from lenslab import sshconfig

    other = sshconfig.ensure_keypair(tmp_path / "other_key")
    known_hosts = home / ".ssh" / "lenslab" / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{cloud.port} {' '.join(Path(f'{other}.pub').read_text().split()[:2])}\n")
    cloud.launch_directly()
    down = cloud.run("down")
    assert down.returncode == 0, down.stderr
    line = one_line(down.stderr)
    assert line.startswith(f"{WARNING} (host key of [127.0.0.1]:{cloud.port} changed")
    assert line.endswith(NOT_CHECKPOINTED)
    assert cloud.emulator.instances == {} and cloud.vms == {}
    assert f"[127.0.0.1]:{cloud.port}" not in known_hosts.read_text()  # the next instance gets pinned afresh
