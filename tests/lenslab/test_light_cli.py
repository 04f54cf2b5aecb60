"""The CLI stays light: it never imports torch or sae-lens, and `--help` answers at once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from lenslab_testkit import VM, lenslab

BLOCKED = ("torch", "sae_lens", "transformer_lens")


def _block_heavy_imports(tmp_path: Path) -> dict[str, str]:
    """A PYTHONPATH where importing torch (or sae-lens) raises, as if it were not installed."""
    shim = tmp_path / "blocked"
    for name in BLOCKED:
        (shim / name).mkdir(parents=True)
        (shim / name / "__init__.py").write_text(f"raise ImportError('{name} is blocked in this test')\n")
    return {"PYTHONPATH": str(shim)}


def test_the_block_really_blocks(tmp_path: Path) -> None:
    env = _block_heavy_imports(tmp_path)
    probe = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True, check=False)
    assert "torch is blocked in this test" in probe.stderr


def test_help_and_status_run_without_torch(tmp_path: Path, box: VM) -> None:
    env = _block_heavy_imports(tmp_path)
    help_ = lenslab("--help", env=env)
    assert help_.returncode == 0, help_.stderr
    assert "up" in help_.stdout and "status" in help_.stdout
    for command in ("up", "status", "ssh", "code", "down", "init"):
        sub = lenslab(command, "--help", env=env)
        assert sub.returncode == 0 and "Example:" in sub.stdout, command

    assert lenslab("up", env=env).returncode == 0
    status = lenslab("status", "--json", env=env)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["reachable"] is True


def test_importing_the_cli_loads_no_heavy_module() -> None:
    code = (
        "import sys, lenslab.cli; "
        "heavy = [m for m in ('torch', 'sae_lens', 'paramiko', 'docker', 'rich', 'pydantic') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
