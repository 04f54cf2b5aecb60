"""The managed ssh config: Include at the very top, idempotent, backed up, removed cleanly,
safe against a concurrent second lenslab, and private file modes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lenslab import files, sshconfig
from lenslab.errors import SSHConfigError

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


def _ssh_g(config: Path, alias: str) -> dict[str, list[str]]:
    """What the real OpenSSH client makes of ``config`` for ``alias`` (``ssh -G``)."""
    out = subprocess.run(["ssh", "-G", "-F", str(config), alias], capture_output=True, text=True, check=True).stdout
    parsed: dict[str, list[str]] = {}
    for line in out.splitlines():
        key, _, value = line.partition(" ")
        parsed.setdefault(key, []).append(value)
    return parsed


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("host", 'h\nMatch exec "touch /tmp/x"', "host 'h\\nMatch exec \"touch /tmp/x\"'"),
        ("host", "-oProxyCommand=sh", "host '-oProxyCommand=sh'"),
        ("host", "h\r", "host 'h\\r'"),
        ("user", "me\n    ProxyCommand sh", "user 'me\\n    ProxyCommand sh'"),
        ("user", "me\x00", "user 'me\\x00'"),
        ("port", 0, "port 0"),
        ("port", True, "port True"),
        ("identity_file", Path("/k/a\nb"), "identity_file '/k/a\\nb'"),
        ("identity_file", Path('/k/my"key'), "identity_file '/k/my\"key'"),
        ("identity_file", Path("/k/%h"), "identity_file '/k/%h'"),
        ("identity_file", Path("/k/${HOME}"), "identity_file '/k/${HOME}'"),
        ("identity_file", Path("/k/\u2028"), "identity_file '/k/\\u2028'"),
        ("root", '/srv/lab\nMatch exec "touch /tmp/x"', "root '/srv/lab\\nMatch"),
        ("root", "/srv/lab\t", "root '/srv/lab\\t'"),
        ("root", "relative", "root 'relative'"),
        ("alias", "lenslab-a b", "alias 'lenslab-a b'"),
    ],
)
def test_entry_refuses_values_that_would_break_the_config(home: Path, field: str, value: object, says: str) -> None:
    fields: dict[str, object] = {
        "alias": "lenslab-a", "host": "127.0.0.1", "port": 22, "user": "debian",
        "identity_file": Path("/keys/id"), "root": "/srv/lab",
    }  # fmt: skip
    fields[field] = value
    with pytest.raises(SSHConfigError) as caught:
        sshconfig.Entry(**fields)  # type: ignore[arg-type]
    assert str(caught.value).startswith(f"refusing to write {says}")
    assert "\n" not in str(caught.value)
    assert not files.config_path().exists()


def test_paths_with_spaces_and_quotes_parse_back_exactly(home: Path, tmp_path: Path) -> None:
    """What lenslab writes, the real OpenSSH client reads back as the same values."""
    key = tmp_path / "my keys" / "o'brien #1" / "id_ed25519"
    entry = sshconfig.Entry("lenslab-a", "fe80::1", 2222, "first.last", key, "/data/my lab")
    sshconfig.add(entry)
    parsed = _ssh_g(home / ".ssh" / "config", "lenslab-a")
    assert parsed["hostname"] == ["fe80::1"]
    assert parsed["user"] == ["first.last"]
    assert parsed["port"] == ["2222"]
    assert parsed["identityfile"] == [str(key)]
    assert parsed["userknownhostsfile"] == [str(files.known_hosts_path())]
    assert parsed["stricthostkeychecking"] == ["true"]
    assert sshconfig.recorded_root("lenslab-a") == "/data/my lab"


def test_a_hand_edited_root_line_is_not_believed(home: Path) -> None:
    sshconfig.add(_entry("a"))
    text = files.config_path().read_text().replace("    HostName", "    # lenslab-root relative/x\n    HostName")
    files.config_path().write_text(text)
    assert sshconfig.recorded_root("lenslab-a") is None


def test_a_symlinked_user_config_stays_a_link_and_its_target_is_edited(home: Path) -> None:
    dotfiles = home / "dotfiles"
    dotfiles.mkdir()
    target = dotfiles / "ssh_config"
    target.write_text(USER_CONFIG)
    target.chmod(0o644)
    user_config = home / ".ssh" / "config"
    user_config.parent.mkdir(mode=0o700)
    user_config.symlink_to(target)

    sshconfig.add(_entry("a"))
    assert user_config.is_symlink() and user_config.resolve() == target
    assert target.read_text().startswith(f"{sshconfig.MARKER}\n") and target.read_text().endswith(USER_CONFIG)
    assert _mode(target) == "0o644"
    # The temporary file was written beside the target and renamed onto it: nothing left over.
    assert sorted(p.name for p in dotfiles.iterdir()) == ["ssh_config"]

    sshconfig.remove("lenslab-a")
    assert user_config.is_symlink() and target.read_text() == USER_CONFIG


def test_write_atomic_through_a_link_keeps_the_link(tmp_path: Path) -> None:
    target = tmp_path / "real"
    target.write_text("old")
    link = tmp_path / "link"
    link.symlink_to(target)
    files.write_atomic(link, "new")
    assert link.is_symlink() and target.read_text() == "new"
