"""The Lambda API emulator, and the flaky proxy in front of it, over real HTTP on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.flaky_proxy import FlakyProxy
from tests.support.lambda_emulator import LambdaEmulator


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[LambdaEmulator]:
    emulator = LambdaEmulator(tmp_path / "filesystems").start()
    emulator.launch_interval = 0.0
    emulator.on_launch = lambda instance: "127.0.0.1"  # no traffic goes there in these tests
    yield emulator
    emulator.stop()


@pytest.fixture
def proxy(emulator: LambdaEmulator) -> Iterator[FlakyProxy]:
    proxy = FlakyProxy(emulator.url).start()
    yield proxy
    proxy.stop()
