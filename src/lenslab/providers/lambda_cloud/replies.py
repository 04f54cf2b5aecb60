"""The shapes of Lambda Cloud API replies, checked where a reply enters lenslab.

Each model follows Lambda's published API v1 (``{"data": ...}`` around every payload). Types
are strict (a price of ``"129"`` or a status of ``5`` is refused, not coerced); fields lenslab
does not read are ignored, so Lambda may add fields freely. Fields lenslab reads and has no
safe default for are required. Anything else (HTML with HTTP 200, ``null``, a list where an
object belongs, a missing or mistyped field) becomes one ``UnexpectedReply`` line that names
the endpoint and the first thing that was wrong.

Values that later reach a shell or the ssh config (the instance's IP, file system names) are
checked again where they are used: a listing must not fail because of an instance or file
system lenslab did not make.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from lenslab.errors import UnexpectedReply

FIX = "Lambda Cloud may be having trouble, or LAMBDA_API_URL points at something else; try again later"


class _Wire(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class Region(_Wire):
    name: str = Field(min_length=1)
    description: str = ""


class InstanceTypeInfo(_Wire):
    name: str = Field(min_length=1)
    description: str = ""
    gpu_description: str = ""
    price_cents_per_hour: int = Field(ge=0)
    specs: dict[str, Any] = Field(default_factory=dict)


class InstanceTypeEntry(_Wire):
    instance_type: InstanceTypeInfo
    regions_with_capacity_available: list[Region]


class InstanceReply(_Wire):
    id: str = Field(min_length=1)
    name: str | None = None
    ip: str | None = None
    status: str = Field(min_length=1)  # booting | active | unhealthy | terminating | terminated | preempted
    ssh_key_names: list[str]
    file_system_names: list[str]
    region: Region | None = None
    instance_type: InstanceTypeInfo | None = None


class LaunchReply(_Wire):
    instance_ids: list[str]


class TerminateReply(_Wire):
    terminated_instances: list[InstanceReply]


class FileSystemReply(_Wire):
    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    region: Region
    is_in_use: bool = False
    mount_point: str | None = None
    bytes_used: int | None = None


class SSHKeyReply(_Wire):
    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    public_key: str


_ADAPTERS: dict[object, TypeAdapter[Any]] = {}


def parse(endpoint: str, shape: Any, data: Any) -> Any:
    """``data`` (the reply's ``data`` member) as ``shape``, or one line naming what was wrong."""
    adapter = _ADAPTERS.get(shape)
    if adapter is None:
        adapter = _ADAPTERS[shape] = TypeAdapter(shape)
    try:
        return adapter.validate_python(data)
    except ValidationError as exc:
        raise UnexpectedReply(
            f"Lambda Cloud API {endpoint}: unexpected reply ({describe(exc)})", FIX, code="lenslab/unexpected-reply"
        ) from exc


def describe(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = "data" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"])
    if first["type"] == "missing":
        what = "missing"
    else:
        what = f"{first['msg'][0].lower()}{first['msg'][1:]}, got {kind_of(first.get('input'))}"
    more = exc.error_count() - 1
    return f"{where}: {what}" + (f"; and {more} more problem(s)" if more else "")


def kind_of(value: object) -> str:
    """A value's JSON type, never the value itself (it could be long, or carry control characters)."""
    if value is None:
        return "null"
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)
