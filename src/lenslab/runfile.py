"""A run file (``RUN.toml`` for ``lenslab-train``), checked on the laptop before anything is uploaded.

When lenslab-workspace is installed here its own validator runs (every SAELens field checked);
otherwise a light check catches what a typo usually breaks. Either way a bad file is one
``ConfigError`` line and nothing reaches the box. ``files()`` is what gets uploaded: the run
file, with its name set, and a local dataset it names by a relative path.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lenslab import contract
from lenslab.errors import ConfigError, LenslabError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

_TOP_NAME = re.compile(r"^name\s*=.*$", re.MULTILINE)
_REQUIRED = ("model_name", "hook_name", "dataset_path", "training_tokens")


@dataclass(frozen=True)
class RunFile:
    path: Path
    name: str
    text: str  # with `name` set to ``name``
    dataset: str | None  # a dataset file next to the run file, relative to it; uploaded too

    def files(self) -> dict[str, bytes]:
        """Relative path on the box -> contents."""
        out = {self.path.name: self.text.encode()}
        if self.dataset:
            out[self.dataset] = (self.path.parent / self.dataset).read_bytes()
        return out

    def uploads(self) -> dict[str, bytes | Path]:
        """Like ``files()``, with the dataset as its local path: ``Runner.put`` streams it in
        chunks, so a large dataset is never held in memory."""
        out: dict[str, bytes | Path] = {self.path.name: self.text.encode()}
        if self.dataset:
            out[self.dataset] = self.path.parent / self.dataset
        return out


def load(path: Path, name: str | None = None) -> RunFile:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the run file ({exc.strerror})") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: the run file is not UTF-8 text (offset {exc.start})", "save it as UTF-8") from exc
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from exc
    _validate(path, raw)
    run_name = name or raw.get("name")
    if not isinstance(run_name, str) or not contract.is_run_name(run_name):
        raise ConfigError(
            f"{path}: run name {run_name!r} is missing or not a simple name",
            f'set name = "..." in the file or pass --name ({contract.RUN_NAME_HELP})',
        )
    return RunFile(path, run_name, _with_name(text, run_name), _local_dataset(path, raw))


def _validate(path: Path, raw: dict[str, Any]) -> None:
    import importlib.util

    if importlib.util.find_spec("lenslab_workspace") is None:
        _light_check(path, raw)  # the CLI alone is installed: the box validates the rest
        return
    try:
        from lenslab_workspace.train.config import load_run_file
        from lenslab_workspace.train.errors import LenslabTrainError
    except ImportError as exc:
        # Installed but broken (a missing dependency): say so, rather than check less in silence.
        raise LenslabError(
            f"lenslab-workspace is installed here but cannot be imported ({exc})",
            "reinstall it (bash provision/python-env.sh), or uninstall it to check run files lightly",
        ) from exc
    try:
        load_run_file(path)
    except LenslabTrainError as exc:
        raise ConfigError(str(exc).splitlines()[0]) from exc


def _light_check(path: Path, raw: dict[str, Any]) -> None:
    for field in _REQUIRED:
        if field not in raw:
            raise ConfigError(f"{path}: field '{field}' is required")
    tokens = raw["training_tokens"]
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens <= 0:
        raise ConfigError(f"{path}: field 'training_tokens': must be a positive integer, got {tokens!r}")
    if not isinstance(raw.get("sae"), dict):
        raise ConfigError(f"{path}: missing [sae] table (architecture, d_in, d_sae, ...)")


def _with_name(text: str, name: str) -> str:
    """The name lives in the file because lenslab-train names the run directory after it."""
    first_table = re.search(r"^\s*\[", text, re.MULTILINE)
    head_end = first_table.start() if first_table else len(text)
    head, rest = text[:head_end], text[head_end:]
    line = f'name = "{name}"'
    if _TOP_NAME.search(head):
        return _TOP_NAME.sub(line, head, count=1) + rest
    return f"{line}\n{text}"


def _local_dataset(path: Path, raw: dict[str, Any]) -> str | None:
    dataset = str(raw.get("dataset_path", ""))
    if not dataset or Path(dataset).is_absolute() or not (path.parent / dataset).is_file():
        return None  # a Hugging Face name, or a path on the box itself
    if ".." in Path(dataset).parts:
        raise ConfigError(
            f"{path}: dataset_path {dataset!r} points outside the run file's directory",
            "move the dataset next to the run file (or below it) so it can be uploaded with it",
        )
    return dataset
