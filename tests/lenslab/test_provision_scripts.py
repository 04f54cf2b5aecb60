"""The bash that runs on boxes (and the test services script) is shellcheck-clean."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = [*sorted((REPO / "provision").glob("*.sh")), *sorted((REPO / "tests" / "services").glob("*.sh"))]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck_clean(script: Path) -> None:
    if shutil.which("shellcheck") is None:
        pytest.fail("shellcheck is missing; start the services with: bash tests/services/start.sh")
    result = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout


def test_the_installed_package_ships_the_scripts() -> None:
    from lenslab.remote.bootstrap import script

    for name in ("bootstrap.sh", "status.sh"):
        assert script(name) == (REPO / "provision" / name).read_bytes()
