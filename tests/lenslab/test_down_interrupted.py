"""Ctrl-C during `lenslab down` on a cloud box never leaves it billing in silence: while the
containers stop, the instance is still terminated; while it is terminated, `down` says it bills.

The cloud is the Lambda API emulator behind a proxy that can hold a reply; the instance's address
is a socket that accepts and never speaks (an SSH handshake that hangs), or nothing at all.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from lambdakit import API_KEY, Cloud, lambda_cloud
from lenslab_testkit import LENSLAB

from tests.support.flaky_proxy import FlakyProxy

TERMINATE = "/api/v1/instance-operations/terminate"
# An instance launched by an earlier lenslab without a launch record here: its price is unknown.
BILLING = "the instance of box gpu may still be running and billing; `lenslab down` terminates it"


@pytest.fixture
def cloud(tmp_path: Path, keypair: Path, project: Path, home: Path) -> Iterator[Cloud]:
    with lambda_cloud(tmp_path, None, project, home) as cloud:
        yield cloud


@pytest.fixture
def proxy(cloud: Cloud) -> Iterator[FlakyProxy]:
    proxy = FlakyProxy(cloud.emulator.url).start()
    cloud.api_url = proxy.url
    yield proxy
    proxy.stop()


def _interrupted_down(cloud: Cloud, ready: Callable[[], bool]) -> subprocess.CompletedProcess[str]:
    """`lenslab down`, sent SIGINT (as Ctrl-C does) once ``ready()``."""
    env = {**os.environ, "LAMBDA_API_KEY": API_KEY, "LAMBDA_API_URL": cloud.api_url}
    with subprocess.Popen(
        [LENSLAB, "down"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    ) as proc:
        deadline = time.monotonic() + 30
        while not ready():
            assert proc.poll() is None and time.monotonic() < deadline, "down ended before the moment to interrupt"
            time.sleep(0.05)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    cloud.outputs += [out, err]
    assert "Traceback" not in err
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_ctrl_c_while_containers_stop_still_terminates(cloud: Cloud) -> None:
    cloud.launch_directly()
    accepted = threading.Event()
    held: list[socket.socket] = []
    with socket.create_server(("127.0.0.1", cloud.port)) as server:

        def hold() -> None:
            conn, _ = server.accept()  # and never send an SSH banner: the link hangs
            held.append(conn)
            accepted.set()

        threading.Thread(target=hold, daemon=True).start()
        result = _interrupted_down(cloud, accepted.is_set)
    for conn in held:
        conn.close()
    assert result.returncode == 0, result.stderr
    assert "training may not have been checkpointed; terminating the instance anyway" in result.stderr
    assert result.stdout.startswith("box gpu is down: terminated the instance")
    assert cloud.emulator.instances == {}


@pytest.mark.slow  # waits out real timeouts or processes: seconds
def test_ctrl_c_while_terminating_says_it_still_bills(cloud: Cloud, proxy: FlakyProxy) -> None:
    cloud.launch_directly()
    proxy.fail("POST", TERMINATE, "timeout", forward=False)
    result = _interrupted_down(cloud, lambda: bool(proxy.applied))
    assert result.returncode == 130
    assert f"the instance was not terminated: {BILLING}" in result.stderr
    assert result.stderr.rstrip().endswith("lenslab: interrupted")
    assert len(cloud.emulator.instances) == 1  # still there, as it said
    again = cloud.run("down")
    assert again.returncode == 0, again.stderr
    assert cloud.emulator.instances == {}
