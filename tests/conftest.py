"""Suite-wide test marks.

Tests that need the Docker Engine or an sshd box (anything using the box or image fixtures)
are marked ``docker`` here, from the fixtures they use, so the fast lane
``pytest -m "not slow and not docker"`` needs no service and no mark can be forgotten.
"""

from __future__ import annotations

import pytest

# Fixtures that start containers: the "fresh VM" boxes and the image tests' Docker client.
DOCKER_FIXTURES = frozenset({"docker_ready", "vm_factory", "client"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if DOCKER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.docker)
