"""Names and types of SAELens's dataclass fields, checked with pydantic.

The field lists are read from SAELens itself (``dataclasses.fields``), so a field SAELens adds
is type-checked without a change here, and a misspelt one is refused with a suggestion.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from functools import cache
from pathlib import Path
from typing import Any

import pydantic
from pydantic import BaseModel, ConfigDict

from lenslab_workspace.train.errors import RunConfigError


def validate_dataclass_fields(
    source: Path, prefix: str, types: dict[FieldName, Any], values: dict[str, Any]
) -> dict[str, Any]:
    """Check names (with a suggestion for typos) and types (pydantic) of SAELens fields."""
    names = {str(field) for field in types}
    for key in values:
        if key not in names:
            hint = difflib.get_close_matches(key, sorted(names), n=1)
            suggestion = f" (did you mean '{prefix}{hint[0]}'?)" if hint else ""
            where = f"[{prefix.rstrip('.')}]" if prefix else "the top level"
            raise RunConfigError(f"{source}: unknown field '{prefix}{key}' in {where}{suggestion}")
    model = _pydantic_model_for(prefix or "runner", tuple(sorted(types.items(), key=lambda kv: kv[0].name)))
    # TOML has arrays, not tuples: an array is accepted where SAELens wants a tuple.
    tuple_fields = {str(f) for f, hint in types.items() if typing.get_origin(hint) is tuple}
    values = {k: tuple(v) if k in tuple_fields and isinstance(v, list) else v for k, v in values.items()}
    try:
        validated = model.model_validate(values)
    except pydantic.ValidationError as exc:
        raise RunConfigError(f"{source}: {describe(exc, prefix)}") from exc
    return {k: getattr(validated, k) for k in values}


@dataclasses.dataclass(frozen=True)
class FieldName:
    """A dataclass field's name, and whether it has no default (so the user must give it)."""

    name: str
    required: bool

    def __str__(self) -> str:
        return self.name


@cache
def _pydantic_model_for(name: str, fields: tuple[tuple[FieldName, Any], ...]) -> type[BaseModel]:
    definitions: dict[str, Any] = {key.name: (hint, ... if key.required else None) for key, hint in fields}
    return pydantic.create_model(
        f"Fields_{name.strip('.')}",
        # Strict: "no" is not a bool and "5" is not an int (an int is still a valid float).
        __config__=ConfigDict(arbitrary_types_allowed=True, strict=True),
        **definitions,
    )


def dataclass_types(cls: type) -> dict[FieldName, Any]:
    hints = typing.get_type_hints(cls)
    return {
        FieldName(f.name, f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING): hints[f.name]
        for f in dataclasses.fields(cls)
    }


def without(types: dict[FieldName, Any], *names: str) -> dict[FieldName, Any]:
    return {field: hint for field, hint in types.items() if field.name not in names}


def describe(exc: pydantic.ValidationError, prefix: str = "") -> str:
    parts = []
    for error in exc.errors():
        field = prefix + ".".join(str(p) for p in error["loc"])
        message = error["msg"]
        if error["type"] == "missing":
            message = "is required"
        elif error["type"] == "extra_forbidden":
            message = "is not a known field"
        elif error["type"] == "value_error":
            message = message.removeprefix("Value error, ")
        given = error.get("input")
        shown = (
            "" if error["type"] in ("missing", "extra_forbidden") or isinstance(given, dict) else f" (got {given!r})"
        )
        parts.append(f"field '{field}': {message}{shown}")
    return "; ".join(parts)


def one_line(text: str) -> str:
    return " ".join(text.split())


@cache
def runner_field_types() -> dict[FieldName, Any]:
    """``LanguageModelSAERunnerConfig``'s fields but the [sae] and [logger] tables."""
    from sae_lens import LanguageModelSAERunnerConfig

    return without(dataclass_types(LanguageModelSAERunnerConfig), "sae", "logger")


@cache
def logger_field_types() -> dict[FieldName, Any]:
    from sae_lens import LoggingConfig

    return dataclass_types(LoggingConfig)


@cache
def sae_field_types() -> dict[str, dict[FieldName, Any]]:
    """Each architecture's ``TrainingSAEConfig`` fields, by architecture name."""
    from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY

    result = {}
    for architecture, (_, config_class) in SAE_TRAINING_CLASS_REGISTRY.items():
        # metadata is filled in by the runner, not by the user
        result[architecture] = without(dataclass_types(config_class), "metadata")
    return result
