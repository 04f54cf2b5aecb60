"""``lenslab.toml``: the project's box, validated by pydantic.

Errors are ``ConfigError`` with one line that names the file and the field. Secrets never live
in the TOML (it is meant to be committed): ``secret()`` reads them from the environment or from
a file only its owner can read.
"""

from __future__ import annotations

import os
import re
import stat
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lenslab.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

CONFIG_NAME = "lenslab.toml"

# Where the persistent root lives when lenslab.toml does not say; "~" is the box user's home.
# For lambda the root is the file system's mount, /lambda/nfs/lenslab-<project>, set at launch.
DEFAULT_ROOTS = {"ssh": "~/lenslab", "local": "~/.local/share/lenslab", "lambda": "~/lenslab"}

# Key names that look like credentials are refused outright: the file is meant to be committed.
_SECRET_NAME = re.compile(r"(api_?key|token|secret|password|passphrase)", re.IGNORECASE)

STARTER = """\
# lenslab.toml: the GPU box this project runs on. Commit this file; it holds no secrets
# (API keys come from the environment, e.g. LAMBDA_API_KEY, or a chmod 600 file).

[box]
# Short name: the ssh alias becomes lenslab-<name> (`ssh lenslab-<name>`, VSCode Remote-SSH).
name = "{name}"
# local: this machine.  ssh: any machine you can SSH into.  lambda: a Lambda Cloud GPU.
provider = "{provider}"
# For provider = "ssh": where the box is and who you log in as.
# host = "203.0.113.7"
# user = "ubuntu"
# port = 22
# identity_file = "~/.ssh/id_ed25519"   # default: ~/.ssh/lenslab/id_ed25519 (lenslab init makes it)
# Persistent root on the box (workspace/, checkpoints/, hf-cache/, runs/ live here).
# root = "~/lenslab"
# min_free_gb = 5   # bootstrap stops when the root's disk has less free space
# required: stop if the box has no NVIDIA GPU.  optional: warn and run on CPU.  none: CPU only.
gpu = "{gpu}"
# Container image for the dev and training containers, built on the box from build_context
# (default: this file's directory when it has a Dockerfile) and rebuilt only when that changes.
image = "lenslab:latest"
# build_context = "path/to/lenslab"      # the directory with lenslab's Dockerfile
# build_args = {{ BASE_IMAGE = "nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04" }}
# jupyter_port = 8888                   # on the box's 127.0.0.1; `lenslab jupyter` tunnels to it
# For provider = "lambda" (API key: LAMBDA_API_KEY or ~/.config/lenslab/lambda-api-key, chmod 600):
# gpu_types = ["A100", "H100", "A10"]   # first with capacity wins
# regions = ["us-east-1", "us-west-1"]  # default: any region
# project = "{name}"                    # file system lenslab-<project> holds your data
# budget_usd = 50                       # `lenslab status` warns from 80 %
"""


class BoxConfig(BaseModel):
    """The ``[box]`` table."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,40}$")
    provider: Literal["local", "ssh", "lambda"]
    host: str | None = None
    user: str | None = None
    port: int = Field(default=22, ge=1, le=65535)
    identity_file: str | None = None
    # SHA256:... as `ssh-keygen -lf` prints it; when set, the first connection verifies it.
    host_key_fingerprint: str | None = Field(default=None, pattern=r"^SHA256:[A-Za-z0-9+/]{43}$")
    root: str | None = None
    gpu: Literal["required", "optional", "none"] = "optional"
    # Bootstrap refuses a box with less free disk than this at the persistent root.
    min_free_gb: int = Field(default=5, ge=0)
    image: str = "lenslab:latest"
    # Directory with the Dockerfile the image is built from (relative to lenslab.toml); by
    # default lenslab.toml's own directory when it holds a Dockerfile.
    build_context: str | None = None
    build_args: dict[str, str] = Field(default_factory=dict)
    # Jupyter's port on the box's loopback interface (the dev container uses the host network).
    jupyter_port: int = Field(default=8888, ge=1, le=65535)
    # provider = "lambda": GPU types in order of preference ("A100" matches every A100 type; an
    # exact type name such as "gpu_1x_a100_sxm4" matches itself), the regions allowed (None: any),
    # the project whose file system lenslab-<project> is the persistent root (default: name),
    # and how long to wait for a launched instance before terminating it.
    gpu_types: list[str] = Field(default_factory=lambda: ["A100", "H100", "A10"], min_length=1)
    regions: list[str] | None = None
    project: str | None = Field(default=None, pattern=r"^[a-zA-Z][a-zA-Z0-9-]{0,40}$")
    boot_timeout_minutes: float = Field(default=15, gt=0)
    # Spend limit for this box in US dollars; `lenslab status` warns from 80 % on, and the
    # box's autostop watcher checkpoints training and terminates the instance at 100 %.
    budget_usd: float | None = Field(default=None, gt=0)
    # Autostop (lambda boxes): "box" lets the box terminate itself after idle_minutes idle (the
    # API key is stored on the box, readable by root only); "laptop" keeps the key off the box
    # and the next `lenslab status` or `lenslab up` terminates an idle box; "off" never stops it.
    autostop: Literal["box", "laptop", "off"] = "box"
    idle_minutes: float = Field(default=30, gt=0)
    # ssh boxes: power the machine off when idle (off by default: it may not be yours alone).
    autostop_poweroff: bool = False

    @model_validator(mode="after")
    def _ssh_needs_a_target(self) -> BoxConfig:
        if self.provider == "ssh":
            for field in ("host", "user"):
                if not getattr(self, field):
                    raise ValueError(f"provider 'ssh' needs box.{field}")
        return self

    @property
    def alias(self) -> str:
        return f"lenslab-{self.name}"

    @property
    def persistent_root(self) -> str:
        return self.root or DEFAULT_ROOTS[self.provider]


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    box: BoxConfig
    # Where it was read from, so later errors can point at it.
    path: Path = Path(CONFIG_NAME)


def find_config(start: Path | None = None) -> Path:
    """The nearest lenslab.toml in ``start`` (default: cwd) or a parent, or ``$LENSLAB_CONFIG``."""
    env = os.environ.get("LENSLAB_CONFIG")
    if env:
        return Path(env)
    here = (start or Path.cwd()).resolve()
    for directory in (here, *here.parents):
        candidate = directory / CONFIG_NAME
        if candidate.is_file():
            return candidate
    raise ConfigError(f"no {CONFIG_NAME} in {here} or its parents", "run `lenslab init` to write one")


def load(path: Path | None = None) -> Config:
    path = path or find_config()
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: file not found", "run `lenslab init` to write one") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from exc
    _refuse_secrets(raw, path)
    try:
        return Config(box=raw.get("box", {}), path=path) if "box" in raw else _missing_box(path)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path)) from exc


def _missing_box(path: Path) -> Config:
    raise ConfigError(f"{path}: missing [box] table", "run `lenslab init` for a commented example")


def _describe(exc: ValidationError, path: Path) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(part) for part in err["loc"])
    field = loc or "box"
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown field"
    elif err["type"] == "missing":
        msg = "required field is missing"
    return f"{path}: {field}: {msg}"


def _refuse_secrets(raw: dict[str, Any], path: Path, prefix: str = "") -> None:
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            _refuse_secrets(value, path, f"{dotted}.")
        elif _SECRET_NAME.search(key):
            raise ConfigError(
                f"{path}: {dotted}: secrets do not belong in {CONFIG_NAME}",
                "set it in the environment or a chmod 600 file instead",
            )


def secret(env_var: str, file: Path) -> str | None:
    """A credential from ``$env_var`` or ``file``; a file others can read is refused."""
    value = os.environ.get(env_var)
    if value:
        return value
    if not file.exists():
        return None
    mode = stat.S_IMODE(file.stat().st_mode)
    if mode & 0o077:
        raise ConfigError(f"{file}: readable by others (mode {mode:o})", f"run `chmod 600 {file}`")
    return file.read_text().strip() or None


def write_starter(path: Path, name: str, provider: str, gpu: str) -> None:
    if path.exists():
        raise ConfigError(f"{path} already exists", "edit it, or delete it to start over")
    path.write_text(STARTER.format(name=name, provider=provider, gpu=gpu))
