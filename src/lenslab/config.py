"""``lenslab.toml``: the project's box, validated by pydantic.

Errors are ``ConfigError`` with one line that names the file and the field. Secrets never live
in the TOML (it is meant to be committed): ``secret()`` reads them from the environment or from
a file only its owner can read.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from lenslab import values
from lenslab.errors import ConfigError
from lenslab.providers import registry

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

CONFIG_NAME = "lenslab.toml"

# Key names that look like credentials are refused outright: the file is meant to be committed.
_SECRET_NAME = re.compile(r"(api_?key|token|secret|password|passphrase)", re.IGNORECASE)
# A lenslab.toml is a few hundred bytes; anything this big is the wrong file (or /dev/zero).
MAX_CONFIG_BYTES = 1 << 20
# [box] image = "stock": a container cloud's own PyTorch image, lenslab installed into a venv on
# the persistent volume at `lenslab up` (remote/stockbox.py), so no registry of lenslab's is needed.
STOCK_IMAGE = "stock"
_INPUT_SHOWN = 60  # characters of a bad value quoted back in an error line

STARTER = """\
# lenslab.toml: the GPU box this project runs on. Commit this file; it holds no secrets
# (API keys come from the environment or a chmod 600 file; see your provider's notes below).

[box]
# Short name: the ssh alias becomes lenslab-<name> (`ssh lenslab-<name>`, VSCode Remote-SSH).
name = "{name}"
{providers}
provider = "{provider}"
{provider_notes}# Persistent root on the box (workspace/, checkpoints/, hf-cache/, runs/ live here).
# root = "~/lenslab"
# min_free_gb = 5   # bootstrap stops when the root's disk has less free space
# required: stop if the box has no NVIDIA GPU.  optional: warn and run on CPU.  none: CPU only.
gpu = "{gpu}"
# Container image for the dev and training containers, built on the box from build_context
# (default: this file's directory when it has a Dockerfile) and rebuilt only when that changes.
image = "lenslab:latest"
# image = "stock"   # a cloud whose instances are containers: its stock PyTorch image; `lenslab up`
#                   # installs lenslab from build_context into a venv on the persistent volume
# build_context = "path/to/lenslab"      # the directory with lenslab's Dockerfile
# build_args = {{ BASE_IMAGE = "nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04" }}
# jupyter_port = 8888                   # on the box's 127.0.0.1; `lenslab jupyter` tunnels to it
# Cloud providers:
# gpu_types = ["A100", "H100", "A10"]   # first with capacity wins
# regions = ["us-east-1", "us-west-1"]  # default: any region
# project = "{name}"                    # the persistent volume lenslab-<project> holds your data
# budget_usd = 50                       # `lenslab status` warns from 80 %
# min_vram_gb = 40                      # `lenslab up --cheapest`: memory per GPU at least
# max_price_per_hour = 2.0              # `lenslab up --cheapest`: $/hour at most
# interruptible = true                  # spot / bid instances, about half price; see `lenslab watch`
# fallback = "on-demand"                # no interruptible offer within max_price_per_hour: "wait"
# resume_wait_minutes = 10              # a preempted instance is waited for this long
"""


def _shaped(problem: Callable[[str], str | None]) -> AfterValidator:
    """A pydantic check from one of ``lenslab.values``' rules; the message quotes the value."""

    def check(value: str) -> str:
        found = problem(value)
        if found:
            raise ValueError(f"{_shown(value)} {found}")
        return value

    return AfterValidator(check)


def _pattern(regex: str, help_text: str) -> AfterValidator:
    return _shaped(lambda value: None if re.fullmatch(regex, value) else f"is not {help_text}")


def _no_url_credentials(value: str) -> str:
    # A user:pass@ in the URL would be printed by `lenslab train`, written into run files and
    # put into instance env; the message never quotes the value, as it holds the secret.
    authority = value.split("://", 1)[-1].split("/", 1)[0]
    if "@" in authority and ":" in authority.rsplit("@", 1)[0]:
        raise ValueError(
            "the URL holds credentials (user:password@); remove them and name the variables "
            "that hold them in mirror_env (e.g. AWS_ACCESS_KEY_ID) instead"
        )
    return value


BoxName = Annotated[str, _shaped(values.box_name_problem)]
Host = Annotated[str, _shaped(values.host_problem)]
User = Annotated[str, _shaped(values.user_problem)]
# Written into ~/.ssh/lenslab/config: nothing OpenSSH would expand or misread.
KeyPath = Annotated[str, _shaped(values.ssh_path_problem)]
LocalPath = Annotated[str, _shaped(values.path_problem)]
RemoteRoot = Annotated[str, _shaped(lambda v: values.path_problem(v, absolute=True))]
Image = Annotated[str, _shaped(values.image_problem)]
BuildArgName = Annotated[str, _pattern(r"[A-Za-z_][A-Za-z0-9_]{0,127}", "a build argument name (letters, digits, '_')")]
BuildArgValue = Annotated[str, _shaped(values.text_problem)]
GPUType = Annotated[str, _pattern(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", "a GPU type such as A100 or gpu_1x_a100_sxm4")]
Region = Annotated[str, _pattern(r"[a-z0-9][a-z0-9-]{0,63}", "a region name such as us-east-1")]


def _provider_problem(value: str) -> str | None:
    """Any provider in the registry is accepted; the message lists them."""
    if value in registry.names():
        return None
    return f"is not a provider: use one of {', '.join(registry.names())}"


ProviderName = Annotated[str, _shaped(_provider_problem)]
# A batch scheduler's names (partition, account, QOS; a partition may be a list "a,b") and its
# time limits: "M", "M:S", "H:M:S", "D-H", "D-H:M", "D-H:M:S", or none.
_SCHEDULER_NAME = r"^[A-Za-z0-9_.-]{1,64}$"
_PARTITION = r"^[A-Za-z0-9_.-]{1,64}(,[A-Za-z0-9_.-]{1,64}){0,15}$"
_TIME_LIMIT = r"^(\d{1,7}(:\d{1,2}){0,2}|\d{1,4}-\d{1,2}(:\d{1,2}){0,2}|UNLIMITED|INFINITE)$"
SCHEDULER_FIELDS = ("partition", "account", "qos", "gpus_per_run", "time_limit", "apptainer")


class BoxConfig(BaseModel):
    """The ``[box]`` table. Strict: TOML has real types, so "22" is no port and "yes" no bool."""

    # No inf or nan: `budget_usd = inf` would be a budget never reached, nan one never compared.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    name: BoxName
    provider: ProviderName
    host: Host | None = None
    user: User | None = None
    port: int = Field(default=22, ge=1, le=65535)
    identity_file: KeyPath | None = None
    # SHA256:... as `ssh-keygen -lf` prints it; when set, the first connection verifies it.
    host_key_fingerprint: str | None = Field(default=None, pattern=r"^SHA256:[A-Za-z0-9+/]{43}$")
    root: RemoteRoot | None = None
    gpu: Literal["required", "optional", "none"] = "optional"
    # Bootstrap refuses a box with less free disk than this at the persistent root.
    min_free_gb: int = Field(default=5, ge=0)
    image: Image = "lenslab:latest"
    # Directory with the Dockerfile the image is built from (relative to lenslab.toml); by
    # default lenslab.toml's own directory when it holds a Dockerfile.
    build_context: LocalPath | None = None
    build_args: dict[BuildArgName, BuildArgValue] = Field(default_factory=dict)
    # Jupyter's port on the box's loopback interface (the dev container uses the host network).
    jupyter_port: int = Field(default=8888, ge=1, le=65535)
    # provider = "lambda": GPU types in order of preference ("A100" matches every A100 type; an
    # exact type name such as "gpu_1x_a100_sxm4" matches itself), the regions allowed (None: any),
    # the project whose file system lenslab-<project> is the persistent root (default: name),
    # and how long to wait for a launched instance before terminating it.
    gpu_types: list[GPUType] = Field(default_factory=lambda: ["A100", "H100", "A10"], min_length=1)
    regions: list[Region] | None = None
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
    # ssh boxes: "none" for a box without a Docker engine that runs lenslab's image (or has
    # lenslab-workspace installed): runs are supervised by `lenslab-box` there, not by Docker.
    engine: Literal["docker", "none"] = "docker"

    # `lenslab up --cheapest` (providers with live offers): the offers it may pick, besides
    # gpu_types and regions: at least this much memory per GPU, at most this much per hour.
    min_vram_gb: float | None = Field(default=None, gt=0)
    max_price_per_hour: float | None = Field(default=None, gt=0)
    # Where runs are mirrored (an fsspec URL such as "s3://bucket/lenslab"); required by
    # providers where nothing outlives an instance (vast), which hand it to the box. `lenslab
    # train` makes it the [resilience] mirror of a run file that names none (lenslab.runmirror).
    mirror: Annotated[str, AfterValidator(_no_url_credentials)] | None = Field(
        default=None, pattern=r"^[a-z][a-z0-9+.-]{0,15}://[!-~]{1,500}$"
    )
    # Environment variables (names) the mirror needs on the box, e.g. AWS_ACCESS_KEY_ID: `lenslab
    # train` copies their values from here into a mode-600 file beside the run file.
    mirror_env: list[Annotated[str, Field(pattern=r"^[A-Z_][A-Z0-9_]{0,63}$")]] = Field(default_factory=list)
    # Interruptible (spot / bid) instances: about half the price, taken back at any moment;
    # `lenslab watch` relaunches or resumes them and the runs resume exactly. With no
    # interruptible offer within max_price_per_hour, fallback "on-demand" takes an on-demand
    # one, "wait" waits for one. A preempted instance the provider keeps is waited for (and
    # resumed) up to resume_wait_minutes before a new one is launched.
    interruptible: bool = False
    fallback: Literal["on-demand", "wait"] = "on-demand"
    resume_wait_minutes: float = Field(default=10, ge=0, le=1440)
    # A cluster's batch scheduler (capabilities.scheduler): how each run is submitted
    # (sbatch --partition, --account, --qos, GPUs per run as --gres, --time), and an Apptainer
    # image to run in (the provider may refuse it). The provider checks the rest (config_problem).
    partition: str | None = Field(default=None, pattern=_PARTITION)
    account: str | None = Field(default=None, pattern=_SCHEDULER_NAME)
    qos: str | None = Field(default=None, pattern=_SCHEDULER_NAME)
    gpus_per_run: int = Field(default=0, ge=0, le=64)
    time_limit: str | None = Field(default=None, pattern=_TIME_LIMIT)
    apptainer: RemoteRoot | None = None

    @model_validator(mode="after")
    def _provider_has_what_it_needs(self) -> BoxConfig:
        # What a provider needs from [box] (e.g. a host and a user) is the provider's to say.
        problem = registry.provider_class(self.provider).config_problem(self)
        if problem:
            raise ValueError(problem)
        caps = registry.provider_class(self.provider).capabilities
        scheduler_only = [name for name in SCHEDULER_FIELDS if name in self.model_fields_set]
        if scheduler_only and caps.scheduler == "none":
            raise ValueError(
                f"{scheduler_only[0]} is for a box whose runs go to a cluster's batch scheduler; "
                f"{self.provider} has none: remove it, or name such a provider"
            )
        if self.interruptible and not caps.interruptible:
            raise ValueError(
                f"interruptible = true, but {self.provider} has no interruptible instances; "
                "set interruptible = false, or a provider that has them (`lenslab offers --interruptible`)"
            )
        if self.image == STOCK_IMAGE and not caps.container_box:
            # Only a cloud whose instances are containers has a stock image to launch.
            raise ValueError(
                f'image = "stock" is for a provider whose instances are containers; not for {self.provider}: '
                "name lenslab's image instead (the default)"
            )
        if self.engine != "docker" and (caps.rents_machines or caps.this_machine):
            # A cloud provider knows what its instances are (capabilities.container_box).
            raise ValueError(f'engine = "{self.engine}" is for a machine you bring over SSH; not for {self.provider}')
        return self

    @property
    def alias(self) -> str:
        return f"lenslab-{self.name}"

    @property
    def persistent_root(self) -> str:
        """``root``, else the provider's default ("~" is the box user's home)."""
        return self.root or registry.provider_class(self.provider).default_root


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
    """The whole file, checked: only a [box] table, every field typed and shaped."""
    path = path or find_config()
    raw = _parse(path)
    _refuse_secrets(raw, path)
    for key, value in raw.items():
        if key != "box":
            what = f"table [{_key(key)}]" if isinstance(value, dict) else f"key {_key(key)}"
            raise ConfigError(f"{path}: unknown {what} at the top level", f"{CONFIG_NAME} holds only a [box] table")
    if "box" not in raw:
        raise ConfigError(f"{path}: missing [box] table", "run `lenslab init` for a commented example")
    if not isinstance(raw["box"], dict):
        raise ConfigError(f"{path}: box: must be a table, written [box]", "run `lenslab init` for a commented example")
    try:
        return Config(box=raw["box"], path=path)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path)) from exc


def _parse(path: Path) -> dict[str, Any]:
    """The file's TOML; anything but a readable, UTF-8, regular file of sane size is one line."""
    try:
        info = path.stat()
        if stat.S_ISDIR(info.st_mode):
            raise ConfigError(f"{path}: is a directory", f"name the {CONFIG_NAME} file itself (--config PATH)")
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{path}: not a regular file", f"name a {CONFIG_NAME} file (--config PATH)")
        if info.st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {info.st_size} bytes is far too big for a {CONFIG_NAME}", "check the path")
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: file not found", "run `lenslab init` to write one") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it ({exc.strerror})", "check the file's permissions") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})", "save it as UTF-8"
        ) from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from exc


def _shown(value: object) -> str:
    """A value quoted back to the user: repr (control characters escaped), cut short."""
    text = repr(value)
    return text if len(text) <= _INPUT_SHOWN else text[: _INPUT_SHOWN - 4] + "...'"


def _key(key: object) -> str:
    text = str(key)
    return text if re.fullmatch(r"[A-Za-z0-9_\[\]-]+", text) else _shown(text)


def _describe(exc: ValidationError, path: Path) -> str:
    err = exc.errors()[0]
    field = ".".join(_key(part) for part in err["loc"] if part != "[key]") or "box"
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown field"
    elif err["type"] == "missing":
        msg = "required field is missing"
    elif err["type"].endswith("_type") or err["type"] in ("literal_error", "string_pattern_mismatch"):
        # Strict types: say what was found, so `port = "22"` reads as the quoting mistake it is.
        msg = f"{msg} (got {_shown(err['input'])})"
    return f"{path}: {field}: {msg}"


def _refuse_secrets(raw: dict[str, Any], path: Path, prefix: str = "") -> None:
    for key, value in raw.items():
        dotted = f"{prefix}{_key(key)}"
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
    try:
        text = file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{file}: cannot read it as UTF-8 text ({exc})", "write the key there again") from exc
    if values.bad_char(text):
        raise ConfigError(f"{file}: holds more than one line or control characters", "write the key alone there")
    return text or None


def write_starter(path: Path, name: str, provider: str, gpu: str) -> None:
    if path.exists() or path.is_symlink():
        raise ConfigError(f"{path} already exists", "edit it, or delete it to start over")
    classes = [registry.provider_class(known) for known in registry.names()]
    text = STARTER.format(
        name=name,
        provider=provider,
        gpu=gpu,
        providers="\n".join(f"# {cls.name}: {cls.summary}" for cls in classes),
        provider_notes="".join(cls.starter_notes for cls in classes),
    )
    try:
        # "x": never through a file (or a link) that appeared since the check above.
        with path.open("x", encoding="utf-8") as handle:
            handle.write(text)
    except FileExistsError as exc:
        raise ConfigError(f"{path} already exists", "edit it, or delete it to start over") from exc
    except OSError as exc:
        with contextlib.suppress(OSError):
            path.unlink()  # a half-written starter (disk full) is not left behind
        raise ConfigError(f"cannot write {path} ({exc.strerror})", "run it in a directory you can write") from exc
