"""The ssh config that plain ``ssh`` and VSCode Remote-SSH use to reach lenslab boxes.

lenslab owns ``~/.ssh/lenslab/config`` (one ``Host lenslab-<name>`` block per box) and adds one
``Include`` line at the very top of the user's ``~/.ssh/config``: VSCode ignores an Include that
comes after a ``Host`` block. The user's file is backed up before each change, never gets a
second Include, and gets its original text back when the last box is removed. All writes hold
lenslab's file lock and replace files atomically.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from lenslab import files, values
from lenslab.errors import SSHConfigError

MARKER = "# Added by lenslab: lenslab-<name> hosts for ssh and VSCode (lenslab down removes it)"
BACKUP_SUFFIX = ".lenslab-backup"
_HOST_LINE = re.compile(r"^Host\s+(\S+)\s*$")
# A path made only of these is written as it is; anything else goes in double quotes.
_PLAIN_PATH = re.compile(r"[A-Za-z0-9/._+,@=:~-]+")
ALIAS = re.compile(r"lenslab-[a-z0-9][a-z0-9-]{0,40}")


@dataclass(frozen=True)
class Entry:
    alias: str
    host: str
    port: int
    user: str
    identity_file: Path
    # The persistent root as the box resolved it (its home can be anywhere); `lenslab code`
    # opens it. Kept as a comment, which OpenSSH and VSCode ignore.
    root: str | None = None

    def __post_init__(self) -> None:
        # lenslab.toml and the bootstrap summary are checked where they are read; this is the
        # last line of defence: a newline here would let in any OpenSSH directive (`Match exec`
        # runs a command at every later ssh, to any host), because the file is included first.
        if ALIAS.fullmatch(self.alias) is None:
            _refuse("alias", self.alias, "is not lenslab-<box name>")
        _refuse("host", self.host, values.host_problem(self.host))
        _refuse("user", self.user, values.user_problem(self.user))
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 1 <= self.port <= 65535:
            _refuse("port", self.port, "is not a port number (1-65535)")
        _refuse("identity_file", str(self.identity_file), values.ssh_path_problem(str(self.identity_file)))
        if self.root is not None:
            _refuse("root", self.root, values.path_problem(self.root, absolute=True, home=False))

    def render(self) -> str:
        lines = [
            f"Host {self.alias}",
            *([f"    # lenslab-root {self.root}"] if self.root else []),
            f"    HostName {self.host}",
            f"    User {self.user}",
            f"    Port {self.port}",
            f"    IdentityFile {_quote(self.identity_file, 'identity_file')}",
            "    IdentitiesOnly yes",
            f"    UserKnownHostsFile {_quote(files.known_hosts_path(), 'known_hosts')}",
            "    StrictHostKeyChecking yes",
            "    ServerAliveInterval 60",
            "    ServerAliveCountMax 3",
        ]
        return "\n".join(lines) + "\n"


def _refuse(field: str, value: object, problem: str | None) -> None:
    if problem:
        raise SSHConfigError(
            f"refusing to write {field} {value!a} into {files.config_path()}: it {problem}",
            "fix the value in lenslab.toml (or on the box) and run `lenslab up` again",
        )


def _quote(path: Path, field: str) -> str:
    # Absolute paths: OpenSSH expands "~" from the passwd database, not $HOME.
    text = str(path.expanduser().resolve())
    _refuse(field, text, values.ssh_path_problem(text))
    return text if _PLAIN_PATH.fullmatch(text) else f'"{text}"'


def include_line() -> str:
    return f"Include {_quote(files.config_path(), 'config path')}"


def _blocks(text: str) -> dict[str, str]:
    blocks: dict[str, str] = {}
    current: str | None = None
    for line in text.splitlines(keepends=True):
        match = _HOST_LINE.match(line)
        if match:
            current = match.group(1)
            blocks[current] = ""
        if current is not None:
            blocks[current] += line
    return blocks


def entries() -> dict[str, str]:
    path = files.config_path()
    return _blocks(path.read_text()) if path.exists() else {}


def recorded_root(alias: str) -> str | None:
    for line in entries().get(alias, "").splitlines():
        if line.strip().startswith("# lenslab-root "):
            root = line.strip().removeprefix("# lenslab-root ")
            # A hand-edited line that is no absolute path is ignored: the box is asked instead.
            return None if values.path_problem(root, absolute=True, home=False) else root
    return None


def add(entry: Entry) -> None:
    with files.locked():
        blocks = entries()
        blocks[entry.alias] = entry.render()
        _write_blocks(blocks)
        _ensure_include()


def remove(alias: str) -> bool:
    """Drop ``alias``; the Include line goes too once no box is left. True if it was there."""
    with files.locked():
        blocks = entries()
        found = blocks.pop(alias, None) is not None
        if blocks:
            _write_blocks(blocks)
        else:
            files.config_path().unlink(missing_ok=True)
            _remove_include()
        return found


def _write_blocks(blocks: dict[str, str]) -> None:
    body = "\n".join(block.rstrip("\n") + "\n" for block in blocks.values())
    files.write_atomic(files.config_path(), "# Managed by lenslab; edits are overwritten.\n\n" + body)


def _user_config() -> Path:
    return files.ssh_dir() / "config"


def _ensure_include() -> None:
    path = _user_config()
    original = path.read_text() if path.exists() else ""
    header = f"{MARKER}\n{include_line()}\n\n"
    if original.startswith(header):
        return
    rest = _strip_ours(original)
    _backup(path, original)
    files.write_atomic(path, header + rest, _mode_of(path))


def _remove_include() -> None:
    path = _user_config()
    if not path.exists():
        return
    original = path.read_text()
    rest = _strip_ours(original)
    if rest != original:
        _backup(path, original)
        if rest.strip() or path.is_symlink():
            # A symlinked config stays a link, even when lenslab's header was all there was.
            files.write_atomic(path, rest, _mode_of(path))
        else:
            path.unlink()  # lenslab's header was all there was


def _strip_ours(text: str) -> str:
    ours = {MARKER, include_line()}
    lines = text.splitlines(keepends=True)
    kept = [line for line in lines if line.rstrip("\n") not in ours]
    # The blank line lenslab put after its header goes with it.
    if len(kept) < len(lines) and kept and kept[0] == "\n" and text.startswith(MARKER):
        kept = kept[1:]
    return "".join(kept)


def _backup(path: Path, text: str) -> None:
    if path.exists():
        files.write_atomic(path.with_name(path.name + BACKUP_SUFFIX), text, _mode_of(path))


def _mode_of(path: Path) -> int:
    return path.stat().st_mode & 0o777 if path.exists() else 0o600


def ensure_keypair(path: Path | None = None) -> Path:
    """lenslab's own ed25519 key (0600), made once; returns the private key's path."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    path = path or files.default_key_path()
    with files.locked():
        if path.exists():
            return path
        key = ed25519.Ed25519PrivateKey.generate()
        private = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        try:
            # O_EXCL with the mode set at creation: the secret is never readable by others, even briefly.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(private)
            path.with_name(path.name + ".pub").write_text(public.decode() + " lenslab\n")
        except OSError as exc:
            path.unlink(missing_ok=True)  # half a key pair would be "made once" forever
            raise SSHConfigError(f"cannot write lenslab's key {path} ({exc.strerror})", f"check {path.parent}") from exc
    return path
