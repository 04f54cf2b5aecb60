"""Where lenslab keeps its files on the user's machine, and how it writes them safely.

Everything lives under ``~/.ssh/lenslab/`` (mode 0700): the ssh config VSCode reads, the pinned
known_hosts, lenslab's own key pair, and a lock file that serialises every writer, so two
``lenslab`` processes at once cannot interleave their edits.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lenslab.errors import SSHConfigError

LOCK_TIMEOUT_SECONDS = 10.0
LOCK_POLL_SECONDS = 0.05


def ssh_dir() -> Path:
    return Path.home() / ".ssh"


def lenslab_dir() -> Path:
    return ssh_dir() / "lenslab"


def known_hosts_path() -> Path:
    return lenslab_dir() / "known_hosts"


def config_path() -> Path:
    return lenslab_dir() / "config"


def default_key_path() -> Path:
    return lenslab_dir() / "id_ed25519"


def ensure_dirs() -> Path:
    for directory in (ssh_dir(), lenslab_dir()):
        if directory.exists() and not directory.is_dir():
            raise SSHConfigError(
                f"{directory} is not a directory", f"move it aside; lenslab keeps its ssh files in {lenslab_dir()}"
            )
        try:
            directory.mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            raise SSHConfigError(
                f"cannot create {directory} ({exc.strerror})",
                "make your home directory writable, or set HOME to one that is",
            ) from exc
    return lenslab_dir()


@contextmanager
def locked() -> Iterator[None]:
    """Hold lenslab's file lock; gives up with a clear error rather than waiting forever."""
    lock_file = ensure_dirs() / ".lock"
    try:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise SSHConfigError(
            f"cannot open {lock_file} ({exc.strerror})", f"check the permissions of {lock_file.parent}"
        ) from exc
    try:
        deadline = time.monotonic() + LOCK_TIMEOUT_SECONDS
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise SSHConfigError(
                        f"another lenslab holds {lock_file}", "wait for it to finish, then retry"
                    ) from None
                time.sleep(LOCK_POLL_SECONDS)
        yield
    finally:
        os.close(fd)  # closing releases the flock


def write_atomic(path: Path, text: str, mode: int = 0o600) -> None:
    """Replace ``path`` in one step, so a crash or a reader never sees half a file.

    A symlinked ``path`` (an ~/.ssh/config kept in a dotfiles repository) stays a link: the new
    text replaces the file it points to, written beside that file so the rename stays atomic."""
    path = path.resolve() if path.is_symlink() else path
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    except OSError as exc:
        raise SSHConfigError(
            f"cannot write {path} ({exc.strerror})", f"check the permissions of {path.parent}"
        ) from exc
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise SSHConfigError(
            f"cannot write {path} ({exc.strerror})", "free some disk space or fix its permissions"
        ) from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
