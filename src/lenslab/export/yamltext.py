"""A small YAML writer for the task files lenslab exports: mappings, lists, strings, numbers.

Plain code on purpose: the exporters run in the light CLI, which imports no YAML library (and
never SkyPilot). Every scalar is written in a form both YAML 1.1 and 1.2 readers take back
unchanged: keys and strings as JSON strings (valid YAML double-quoted scalars), multi-line
scripts as literal blocks when that is exact, and as a JSON string when it is not.
"""

from __future__ import annotations

import json
import re

# Mapping keys written bare: identifiers no YAML reader turns into anything but that string.
_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NOT_PLAIN = {"y", "n", "yes", "no", "on", "off", "true", "false", "null"}
# What a literal block carries exactly: printable text, tabs and line feeds (no CR, which a
# reader folds into the line break; no control or non-characters).
# U+2028/2029 are line breaks to a YAML 1.1 reader; U+FEFF a byte-order mark.
_PRINTABLE = "\x20-\x7e\xa0-\u2027\u202a-\ud7ff\ue000-\ufefe\uff00-\ufffd\U00010000-\U0010ffff"
_LITERAL_SAFE = re.compile(f"[\t\n{_PRINTABLE}]*")
_UNPRINTABLE = re.compile(f"[^{_PRINTABLE}]")
INDENT = "  "

Value = dict[str, "Value"] | list["Value"] | str | int | float | bool | None


def dump(data: dict[str, Value], header: str = "") -> str:
    """The YAML document for ``data``, after ``header``'s lines as comments."""
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    lines += _mapping(data, 0)
    return "\n".join(lines) + "\n"


def _key(key: str) -> str:
    return key if _PLAIN_KEY.fullmatch(key) and key.lower() not in _NOT_PLAIN else _quoted(key)


def _quoted(text: str) -> str:
    """A JSON string whose every unprintable character is an escape YAML reads back the same
    (JSON leaves DEL, C1 controls and line separators raw; a YAML reader would not keep them)."""
    return _UNPRINTABLE.sub(lambda m: _escape(m.group()), json.dumps(text, ensure_ascii=False))


def _escape(char: str) -> str:
    code = ord(char)
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def _scalar(value: Value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return json.dumps(value)
    if isinstance(value, str):
        return _quoted(value)
    raise TypeError(f"not a scalar: {type(value).__name__}")


def _literal_lines(text: str, depth: int) -> list[str] | None:
    """``text`` as the lines of a literal block (``|``), or None where a block would change it."""
    if not text.endswith("\n") or text.endswith("\n\n") or not _LITERAL_SAFE.fullmatch(text):
        return None  # a block keeps exactly one final line break ("clip")
    body = text[:-1].split("\n")
    if body[0][:1] in (" ", "\t", ""):
        return None  # a first line's own indentation would be read as the block's
    pad = INDENT * depth
    return [f"{pad}{line}" if line else "" for line in body]


def _mapping(data: dict[str, Value], depth: int) -> list[str]:
    pad = INDENT * depth
    lines: list[str] = []
    for key, value in data.items():
        head = f"{pad}{_key(key)}:"
        lines += _entry(head, value, depth)
    return lines


def _entry(head: str, value: Value, depth: int) -> list[str]:
    if isinstance(value, dict):
        return [f"{head} {{}}"] if not value else [head, *_mapping(value, depth + 1)]
    if isinstance(value, list):
        return [f"{head} []"] if not value else [head, *_sequence(value, depth + 1)]
    if isinstance(value, str) and "\n" in value:
        block = _literal_lines(value, depth + 1)
        if block is not None:
            return [f"{head} |", *block]
    return [f"{head} {_scalar(value)}"]


def _sequence(items: list[Value], depth: int) -> list[str]:
    pad = INDENT * depth
    lines: list[str] = []
    for item in items:
        if isinstance(item, dict) and item:
            # "- " then the mapping's first entry on the same line, the rest below it.
            inner = _mapping(item, depth + 1)
            lines.append(f"{pad}- {inner[0].lstrip()}")
            lines += inner[1:]
        elif isinstance(item, list) and item:
            lines.append(f"{pad}-")
            lines += _sequence(item, depth + 1)
        else:
            lines += _entry(f"{pad}-", item, depth)
    return lines
