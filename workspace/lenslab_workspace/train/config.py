"""The run file: a TOML whose training fields are SAELens's own.

Top-level keys are the fields of ``sae_lens.LanguageModelSAERunnerConfig`` (``model_name``,
``hook_name``, ``dataset_path``, ``context_size``, ``training_tokens``, ``lr``, ...), ``[sae]``
holds ``architecture`` plus the fields of that architecture's ``TrainingSAEConfig``
(``d_in``, ``d_sae``, ``k``, ``l1_coefficient``, ...) and ``[logger]`` those of SAELens's
``LoggingConfig``. lenslab adds ``name`` (the run's directory), ``[resilience]`` and
``[tiny_random]`` (an offline, randomly initialised TransformerLens model).

The SAELens field lists are read from SAELens itself, so a new SAELens field is accepted
without a change here, and a misspelt one is refused with a suggestion.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import re
import sys
import typing
from functools import cache
from pathlib import Path
from typing import Any

import pydantic
from pydantic import BaseModel, ConfigDict, Field, field_validator

from lenslab.contract import RUN_NAME_HELP, is_run_name
from lenslab_workspace.train.errors import RunConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

TINY_RANDOM_MODEL = "tiny-random"

# Fields of LanguageModelSAERunnerConfig that lenslab replaces with its own run directory,
# checkpoints and resume. Accepted (so an existing SAELens config file loads) but ignored.
MANAGED_BY_LENSLAB = frozenset(
    {"checkpoint_path", "n_checkpoints", "save_final_checkpoint", "output_path", "resume_from_checkpoint"}
)
# Fields whose SAELens feature lenslab cannot make resumable yet; setting them is an error.
UNSUPPORTED = {
    "use_cached_activations": "cached activations are not resumable by lenslab yet; set it to false",
    "prefetch_llm_batches": "prefetching breaks exact resume; set it to false",
}


# A mirror: a URL with a scheme (s3://bucket/prefix, file:///abs/path) or an absolute path.
MIRROR_URL = re.compile(r"[a-z][a-z0-9+.-]*://[^\s\x00-\x1f\x7f]+")
MIRROR_PATH = re.compile(r"/[^\x00-\x1f\x7f]*")


class ResilienceConfig(BaseModel):
    """``[resilience]``: how often and where checkpoints go, and how strict resume is."""

    # Strict: a run file says what it means ("no" is not a bool, "5" is not a number).
    model_config = ConfigDict(extra="forbid", strict=True)

    checkpoint_every_seconds: float = Field(300.0, gt=0)
    checkpoint_every_tokens: int | None = Field(None, gt=0)
    keep_last: int = Field(3, ge=1)
    mirror: str | None = None
    # An unreachable mirror is retried in the background (first retry after
    # mirror_retry_seconds, doubling up to a minute); the run fails only after this many
    # failed uploads in a row.
    mirror_max_consecutive_failures: int = Field(10, ge=1)
    mirror_retry_seconds: float = Field(5.0, gt=0)
    exact: bool = True
    # How often status.json is rewritten; the laptop polls it.
    status_every_seconds: float = Field(2.0, gt=0)

    @field_validator("mirror")
    @classmethod
    def _mirror_is_url_or_absolute(cls, value: str | None) -> str | None:
        if value is not None and not (MIRROR_URL.fullmatch(value) or MIRROR_PATH.fullmatch(value)):
            raise ValueError("must be a URL with a scheme (s3://bucket/prefix, file:///abs/dir) or an absolute path")
        return value


class TinyRandomConfig(BaseModel):
    """``[tiny_random]``: a small randomly initialised HookedTransformer, no download needed.

    It has no tokenizer: text is encoded as UTF-8 bytes (ids 0-255) and the id ``d_vocab - 1``
    is the BOS token, so ``d_vocab`` must be at least 257.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    n_layers: int = Field(2, ge=1)
    d_model: int = Field(64, ge=1)
    n_heads: int = Field(4, ge=1)
    d_head: int = Field(16, ge=1)
    d_mlp: int = Field(256, ge=1)
    d_vocab: int = Field(257, ge=257)
    n_ctx: int = Field(256, ge=1)
    act_fn: str = "gelu"
    normalization_type: str | None = "LN"
    seed: int = 0


class RunFile(BaseModel):
    """The whole run file after the lenslab-only parts are validated."""

    model_config = ConfigDict(extra="allow")

    name: str
    sae: dict[str, Any]
    logger: dict[str, Any] = Field(default_factory=dict)
    resilience: ResilienceConfig = Field(default_factory=ResilienceConfig)
    tiny_random: TinyRandomConfig | None = None

    @field_validator("name", mode="before")
    @classmethod
    def _run_name(cls, value: Any) -> Any:
        if not isinstance(value, str) or not is_run_name(value):
            raise ValueError(f"a run name is {RUN_NAME_HELP}")
        return value


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """A validated run: the SAELens config plus lenslab's own settings."""

    source: Path
    name: str
    architecture: str
    runner_fields: dict[str, Any]
    sae_fields: dict[str, Any]
    logger_fields: dict[str, Any]
    resilience: ResilienceConfig
    tiny_random: TinyRandomConfig | None

    def comparable(self) -> dict[str, Any]:
        """Everything that defines the run, as plain JSON values (saved as run-config.json)."""
        plain: dict[str, Any] = json.loads(
            json.dumps(
                {
                    "name": self.name,
                    "architecture": self.architecture,
                    "runner": self.runner_fields,
                    "sae": self.sae_fields,
                    "logger": self.logger_fields,
                    "resilience": self.resilience.model_dump(),
                    "tiny_random": self.tiny_random.model_dump() if self.tiny_random else None,
                },
                sort_keys=True,
                default=str,
            )
        )
        return plain

    def config_hash(self) -> str:
        """Hash of the fields that make resuming meaningful (see ``resume_relevant``)."""
        blob = json.dumps(resume_relevant(self.comparable()), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def runner_config(self) -> Any:
        """SAELens's ``LanguageModelSAERunnerConfig`` for this run (imports sae_lens)."""
        from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig
        from sae_lens.registry import get_sae_training_class

        _, sae_config_class = get_sae_training_class(self.architecture)
        try:
            sae_cfg = sae_config_class(**self.sae_fields)
            return LanguageModelSAERunnerConfig(
                sae=sae_cfg,
                logger=LoggingConfig(**self.logger_fields),
                checkpoint_path=None,
                output_path=None,
                **self.runner_fields,
            )
        except (ValueError, TypeError) as exc:
            raise RunConfigError(f"{self.source}: {_one_line(str(exc))}") from exc


# Fields that may change between launches of the same run without making the resume wrong.
HARMLESS_PREFIXES = (
    "resilience.checkpoint_every_seconds",
    "resilience.checkpoint_every_tokens",
    "resilience.keep_last",
    "resilience.mirror",
    "resilience.status_every_seconds",
    "logger.",
    "runner.verbose",
    "runner.n_eval_batches",
    "runner.eval_batch_size_prompts",
    # A new box may have another device; resuming is still right, only bit-exactness across
    # devices is not promised (the runner warns).
    "runner.device",
    "runner.llm_device",
    "runner.act_store_device",
    "sae.device",
)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, path + "."))
        else:
            flat[path] = value
    return flat


def resume_relevant(comparable: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in flatten(comparable).items() if not k.startswith(HARMLESS_PREFIXES)}


def changed_fields(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Resume-relevant fields whose values differ, as dotted names (``sae.d_sae``)."""
    old, new = resume_relevant(saved), resume_relevant(current)
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


def load_run_file(path: str | Path) -> RunSettings:
    """Read and validate a run file; every error names the file and the field."""
    source = Path(path)
    try:
        raw = tomllib.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise RunConfigError(f"{source}: no such run file; pass the path of a .toml run file") from exc
    except tomllib.TOMLDecodeError as exc:
        raise RunConfigError(f"{source}: not valid TOML: {exc}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise RunConfigError(f"{source}: cannot read the run file: {exc}") from exc

    _check_finite(source, raw)
    try:
        run = RunFile.model_validate(raw)
    except pydantic.ValidationError as exc:
        raise RunConfigError(f"{source}: {_describe(exc)}") from exc

    runner_fields = dict(run.model_extra or {})
    _check_unsupported(source, runner_fields)
    for key in MANAGED_BY_LENSLAB & runner_fields.keys():
        runner_fields.pop(key)
    runner_fields = _validate_dataclass_fields(source, "", _runner_field_types(), runner_fields)

    sae_raw = dict(run.sae)
    architecture = sae_raw.pop("architecture", "standard")
    architectures = _sae_field_types()
    if architecture not in architectures:
        raise RunConfigError(
            f"{source}: field 'sae.architecture': unknown architecture {architecture!r}; "
            f"choose one of {', '.join(sorted(architectures))}"
        )
    sae_raw.setdefault("device", runner_fields.get("device", "cpu"))
    sae_fields = _validate_dataclass_fields(source, "sae.", architectures[architecture], sae_raw)

    logger_raw = {"log_to_wandb": False, **run.logger}
    logger_fields = _validate_dataclass_fields(source, "logger.", _logger_field_types(), logger_raw)
    if logger_fields["log_to_wandb"]:
        raise RunConfigError(
            f"{source}: field 'logger.log_to_wandb': wandb logging is not supported by lenslab-train yet; "
            "set it to false (progress goes to the terminal and status.json)"
        )

    _check_ranges(source, architecture, runner_fields, sae_fields)
    if runner_fields.get("model_name") == TINY_RANDOM_MODEL and run.tiny_random is None:
        run.tiny_random = TinyRandomConfig()
    _resolve_dataset_path(source, runner_fields)

    return RunSettings(
        source=source,
        name=run.name,
        architecture=architecture,
        runner_fields=runner_fields,
        sae_fields=sae_fields,
        logger_fields=logger_fields,
        resilience=run.resilience,
        tiny_random=run.tiny_random,
    )


# Numbers SAELens accepts silently but cannot train with; checked before anything is built.
POSITIVE_RUNNER_FIELDS = (
    "context_size",
    "training_tokens",
    "train_batch_size_tokens",
    "store_batch_size_prompts",
    "n_batches_in_buffer",
    "lr",
)
NON_NEGATIVE_RUNNER_FIELDS = ("lr_warm_up_steps", "lr_decay_steps", "n_batches_for_norm_estimate")
TOPK_ARCHITECTURES = ("topk", "batchtopk", "matryoshka_batchtopk", "abstopk")


def _check_ranges(source: Path, architecture: str, runner: dict[str, Any], sae: dict[str, Any]) -> None:
    def refuse(field: str, value: Any, rule: str) -> None:
        raise RunConfigError(f"{source}: field '{field}': must be {rule} (got {value!r})")

    for key in POSITIVE_RUNNER_FIELDS:
        if key in runner and not runner[key] > 0:
            refuse(key, runner[key], "positive")
    for key in NON_NEGATIVE_RUNNER_FIELDS:
        if key in runner and runner[key] < 0:
            refuse(key, runner[key], "zero or more")
    fraction = runner.get("activations_mixing_fraction", 0.5)
    if not 0 <= fraction < 1:
        refuse("activations_mixing_fraction", fraction, "at least 0 and below 1")
    for key in ("d_in", "d_sae"):
        if not sae[key] > 0:
            refuse(f"sae.{key}", sae[key], "positive")
    if architecture in TOPK_ARCHITECTURES and "k" in sae and not 1 <= sae["k"] <= sae["d_sae"]:
        refuse("sae.k", sae["k"], f"between 1 and sae.d_sae ({sae['d_sae']})")


def _check_finite(source: Path, value: Any, field: str = "") -> None:
    """TOML allows inf and nan; no field of a run file means them (lr = inf trains with nan)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise RunConfigError(f"{source}: field '{field}': must be a finite number (got {value!r})")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_finite(source, item, f"{field}.{key}" if field else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_finite(source, item, f"{field}[{index}]")


def _check_unsupported(source: Path, fields: dict[str, Any]) -> None:
    for key, why in UNSUPPORTED.items():
        if fields.get(key):
            raise RunConfigError(f"{source}: field '{key}': {why}")


def _resolve_dataset_path(source: Path, fields: dict[str, Any]) -> None:
    """A dataset path relative to the run file is made absolute; HF names are left alone.

    A value that can only be a local file (absolute, ``./``, or a data file's suffix) must
    exist: otherwise it would be looked up on the Hugging Face hub as a dataset name.
    """
    dataset = fields.get("dataset_path", "")
    if not dataset:
        raise RunConfigError(
            f"{source}: field 'dataset_path' is required: a Hugging Face dataset name or a local "
            ".jsonl/.parquet/.arrow file"
        )
    path = Path(dataset)
    candidate = path if path.is_absolute() else (source.parent / dataset).resolve()
    if candidate.exists():
        fields["dataset_path"] = str(candidate)
        return
    looks_local = path.is_absolute() or dataset.startswith(("./", "../")) or path.suffix in LOCAL_SUFFIXES
    if looks_local:
        raise RunConfigError(
            f"{source}: field 'dataset_path': no such file {candidate}; a relative path is relative to the run file"
        )


LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow")


def _validate_dataclass_fields(
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
        raise RunConfigError(f"{source}: {_describe(exc, prefix)}") from exc
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


def _dataclass_types(cls: type) -> dict[FieldName, Any]:
    hints = typing.get_type_hints(cls)
    return {
        FieldName(f.name, f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING): hints[f.name]
        for f in dataclasses.fields(cls)
    }


def _without(types: dict[FieldName, Any], *names: str) -> dict[FieldName, Any]:
    return {field: hint for field, hint in types.items() if field.name not in names}


@cache
def _runner_field_types() -> dict[FieldName, Any]:
    from sae_lens import LanguageModelSAERunnerConfig

    return _without(_dataclass_types(LanguageModelSAERunnerConfig), "sae", "logger", *MANAGED_BY_LENSLAB)


@cache
def _logger_field_types() -> dict[FieldName, Any]:
    from sae_lens import LoggingConfig

    return _dataclass_types(LoggingConfig)


@cache
def _sae_field_types() -> dict[str, dict[FieldName, Any]]:
    from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY

    result = {}
    for architecture, (_, config_class) in SAE_TRAINING_CLASS_REGISTRY.items():
        # metadata is filled in by the runner, not by the user
        result[architecture] = _without(_dataclass_types(config_class), "metadata")
    return result


def _describe(exc: pydantic.ValidationError, prefix: str = "") -> str:
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


def _one_line(text: str) -> str:
    return " ".join(text.split())
