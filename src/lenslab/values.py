"""The shapes lenslab accepts for values that reach a config file or a command line.

Dependency-free, so ``lenslab.config`` (lenslab.toml, via pydantic), ``lenslab.sshconfig``
(the values it writes into ``~/.ssh/lenslab/config``) and the bootstrap summary check the same
rules. Each ``*_problem`` function returns ``None`` for a good value, or what is wrong with it
in a few words, so every caller can name its own field in its one-line error.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata

# A DNS name (labels of letters, digits and inner hyphens; "_" too, as /etc/hosts aliases
# have it) or an IPv4 address; IPv6 is checked with ipaddress. Never starts with "-": ssh
# would read it as an option.
_HOST_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
HOST = re.compile(rf"{_HOST_LABEL}(?:\.{_HOST_LABEL})*\.?")
HOST_HELP = "a host name or an IPv4/IPv6 address (IPv6 without brackets)"
# Portable POSIX user names, as useradd and OpenSSH both take them.
USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,31}")
USER_HELP = "1-32 letters, digits, '.', '_' or '-', not starting with '.' or '-'"
# lenslab's box names: they become the ssh alias lenslab-<name>.
BOX_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,40}")
BOX_NAME_HELP = "1-41 lower-case letters, digits or '-', starting with a letter or digit"
# OpenSSH expands "%x" and "${VAR}" in paths, and cannot portably escape a double quote or a
# backslash inside a quoted value; a path holding one is refused rather than misread.
SSH_PATH_SPECIAL = frozenset('"\\%$')
MAX_PATH = 4096
# Docker image references (distribution/reference's grammar): [domain[:port]/]path[:tag][@digest].
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN = r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*(?::[0-9]+)?"
IMAGE = re.compile(
    rf"(?:{_DOMAIN}/)?{_COMPONENT}(?:/{_COMPONENT})*(?::[A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}})?"
    r"(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?"
)
IMAGE_HELP = "a Docker image reference such as lenslab:latest or ghcr.io/org/image:tag"


def bad_char(text: str) -> str | None:
    """The first character that could break a line or hide in one, as a readable escape.

    Control and format characters (newline, CR, tab, NUL, ESC, zero-width and bidi marks),
    line/paragraph separators, and any whitespace other than a plain space."""
    for char in text:
        category = unicodedata.category(char)
        if category[0] == "C" or category in ("Zl", "Zp") or (char.isspace() and char != " "):
            return ascii(char)[1:-1] if char.isascii() else f"U+{ord(char):04X}"
    return None


def text_problem(text: str) -> str | None:
    """A single-line value: no control characters, no leading or trailing spaces."""
    char = bad_char(text)
    if char is not None:
        return f"holds the control or whitespace character {char}"
    if text != text.strip():
        return "starts or ends with a space"
    return None


def host_problem(host: str) -> str | None:
    if ":" in host:
        if "%" in host:  # a zone (fe80::1%eth0): OpenSSH would expand "%e" in HostName
            return f"is not {HOST_HELP}; a zone index (%...) cannot be written to an ssh config"
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return f"is not {HOST_HELP}"
        return None
    if len(host) > 253 or HOST.fullmatch(host) is None:
        return f"is not {HOST_HELP}"
    return None


def box_name_problem(name: str) -> str | None:
    return None if BOX_NAME.fullmatch(name) else f"is not a box name ({BOX_NAME_HELP})"


def user_problem(user: str) -> str | None:
    return None if USER.fullmatch(user) else f"is not a user name ({USER_HELP})"


def path_problem(path: str, *, absolute: bool = False, home: bool = True) -> str | None:
    """A path lenslab passes on: single-line text; ``absolute`` also wants "/" or "~/" first
    (``home``: a leading "~" for the user's home is fine)."""
    if not path:
        return "is empty"
    if len(path) > MAX_PATH:
        return f"is longer than {MAX_PATH} characters"
    problem = text_problem(path)
    if problem:
        return problem
    if absolute:
        starts = ("/", "~/") if home else ("/",)
        if not (path.startswith(starts) or (home and path == "~")):
            return "is not an absolute path (" + ("'/...' or '~/...'" if home else "'/...'") + ")"
        if ".." in path.split("/"):
            return "holds a '..' component"
    return None


def ssh_path_problem(path: str) -> str | None:
    """A path written into an ssh config line (IdentityFile, UserKnownHostsFile, Include)."""
    problem = path_problem(path)
    if problem:
        return problem
    special = sorted(SSH_PATH_SPECIAL.intersection(path))
    if special:
        return f"holds {' '.join(special)}, which OpenSSH would expand or misread"
    return None


def image_problem(image: str) -> str | None:
    if len(image) > 255 or IMAGE.fullmatch(image) is None:
        return f"is not {IMAGE_HELP}"
    return None
