"""What the built wheel ships: the box scripts lenslab runs, and nothing meant for a checkout."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BOX_SCRIPTS = {"bootstrap.sh", "status.sh", "install-autostop.sh", "autostop.py"}


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    # Built from a copy, as from a fresh checkout: no build/ or egg-info of an editable install.
    source = tmp_path_factory.mktemp("source")
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(source)],
        check=True,
        capture_output=True,
    )
    (wheel,) = out.glob("lenslab-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


def test_wheel_ships_exactly_the_box_scripts(wheel_names: set[str]) -> None:
    shipped = {Path(name).name for name in wheel_names if name.startswith("lenslab/provision/")}
    assert shipped == BOX_SCRIPTS


def test_wheel_has_the_contract_and_no_tests(wheel_names: set[str]) -> None:
    assert "lenslab/contract.py" in wheel_names
    assert "lenslab/py.typed" in wheel_names
    assert not any(name.startswith(("tests/", "workspace/", "bench/")) for name in wheel_names)


def test_installed_box_scripts_are_readable_through_the_package() -> None:
    from importlib import resources

    for name in BOX_SCRIPTS:
        assert (resources.files("lenslab") / "provision" / name).read_bytes()
