"""The managed ssh config: Include at the very top, idempotent, backed up, removed cleanly,
safe against a concurrent second lenslab, and private file modes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from lenslab import files, sshconfig

USER_CONFIG = "Host work\n    HostName work.example\n    User me\n"


def _entry(name: str, port: int = 2222) -> sshconfig.Entry:
    return sshconfig.Entry(f"lenslab-{name}", "127.0.0.1", port, "debian", Path("/keys/id_ed25519"))


def _mode(path: Path) -> str:
    return oct(path.stat().st_mode & 0o777)


def test_include_goes_first_once_with_a_backup_and_leaves_cleanly(home: Path) -> None:
    user_config = home / ".ssh" / "config"
    user_config.parent.mkdir(mode=0o700)
    user_config.write_text(USER_CONFIG)
    user_config.chmod(0o644)

    sshconfig.add(_entry("a"))
    sshconfig.add(_entry("b"))
    sshconfig.add(_entry("a", port=2223))

    text = user_config.read_text()
    include = f"Include {home}/.ssh/lenslab/config"
    assert text == f"{sshconfig.MARKER}\n{include}\n\n{USER_CONFIG}"
    assert text.count("Include") == 1
    assert _mode(user_config) == "0o644"  # the user's choice of mode is kept
    backup = home / ".ssh" / "config.lenslab-backup"
    assert backup.read_text() == USER_CONFIG
    assert set(sshconfig.entries()) == {"lenslab-a", "lenslab-b"}
    assert "Port 2223" in sshconfig.entries()["lenslab-a"]

    assert sshconfig.remove("lenslab-a") is True
    assert sshconfig.remove("lenslab-a") is False
    assert user_config.read_text() == text  # one box left: the Include stays
    sshconfig.remove("lenslab-b")
    assert user_config.read_text() == USER_CONFIG
    assert not files.config_path().exists()


def test_include_is_moved_above_host_blocks_that_came_before_it(home: Path) -> None:
    user_config = home / ".ssh" / "config"
    user_config.parent.mkdir(mode=0o700)
    include = f"Include {home}/.ssh/lenslab/config"
    user_config.write_text(f"{USER_CONFIG}{include}\n")
    sshconfig.add(_entry("a"))
    lines = user_config.read_text().splitlines()
    assert lines[:2] == [sshconfig.MARKER, include]
    assert lines.count(include) == 1


def test_a_config_lenslab_created_is_deleted_on_the_last_removal(home: Path) -> None:
    sshconfig.add(_entry("a"))
    user_config = home / ".ssh" / "config"
    assert _mode(user_config) == "0o600"
    sshconfig.remove("lenslab-a")
    assert not user_config.exists()


def test_files_are_private(home: Path) -> None:
    sshconfig.add(_entry("a"))
    key = sshconfig.ensure_keypair()
    assert _mode(home / ".ssh") == "0o700"
    assert _mode(files.lenslab_dir()) == "0o700"
    assert _mode(key) == "0o600"
    assert _mode(files.config_path()) == "0o600"
    assert sshconfig.ensure_keypair() == key  # made once, never overwritten


def test_concurrent_writers_lose_nothing(home: Path) -> None:
    """Eight lenslab processes add their box at once: every entry and one Include survive."""
    code = (
        "import sys; from pathlib import Path; from lenslab import sshconfig\n"
        "n = sys.argv[1]\n"
        "for i in range(5):\n"
        "    sshconfig.add(sshconfig.Entry(f'lenslab-{n}', '127.0.0.1', 2200 + i, 'u', Path('/k')))\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, f"p{n}"]) for n in range(8)]
    assert [p.wait(timeout=60) for p in procs] == [0] * 8
    assert set(sshconfig.entries()) == {f"lenslab-p{n}" for n in range(8)}
    assert (home / ".ssh" / "config").read_text().count("Include") == 1
