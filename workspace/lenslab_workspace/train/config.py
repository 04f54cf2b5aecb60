"""The run file: a TOML whose training fields are SAELens's own.

Top-level keys are the fields of ``sae_lens.LanguageModelSAERunnerConfig`` (``model_name``,
``hook_name``, ``dataset_path``, ``context_size``, ``training_tokens``, ``lr``, ...), ``[sae]``
holds ``architecture`` plus the fields of that architecture's ``TrainingSAEConfig``
(``d_in``, ``d_sae``, ``k``, ``l1_coefficient``, ...) and ``[logger]`` those of SAELens's
``LoggingConfig``. lenslab adds ``name`` (the run's directory), ``[resilience]`` and
``[tiny_random]`` (an offline, randomly initialised TransformerLens model).

What lenslab does with each SAELens field is in fields.py; names and types are checked
against SAELens's own dataclasses (fieldtypes.py), so a misspelt field is refused with a
suggestion. The ``[logger]`` fields are handled in one place, ``_logger_fields`` below.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import pydantic
from pydantic import BaseModel, ConfigDict, Field, field_validator

from lenslab.contract import RUN_NAME_HELP, is_run_name
from lenslab_workspace.train.errors import RunConfigError
from lenslab_workspace.train.fields import REPLACED, check_refused, replaced_notes
from lenslab_workspace.train.fieldtypes import (
    describe,
    logger_field_types,
    one_line,
    runner_field_types,
    sae_field_types,
    validate_dataclass_fields,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

TINY_RANDOM_MODEL = "tiny-random"
SAELENS_SEED = 42  # LanguageModelSAERunnerConfig.seed's default


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
    is the BOS token, so ``d_vocab`` must be at least 257. ``seed`` seeds its weights; left
    out, the run's ``seed`` does (so ``seed`` changes the model as well as the SAE's
    initialisation and the mixing order).
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
    seed: int | None = None


class RunFile(BaseModel):
    """The whole run file after the lenslab-only parts are validated."""

    model_config = ConfigDict(extra="allow")

    name: str
    sae: dict[str, Any] = Field(default_factory=dict)
    # A group of SAEs trained from one model pass (group_config.py): a list of SAE tables,
    # or a grid over SAE fields.
    saes: list[dict[str, Any]] | None = None
    sweep: dict[str, Any] | None = None
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
    # Lines for train.log about fields lenslab accepts but does itself (fields.REPLACED).
    notes: tuple[str, ...] = ()
    # A group run: each SAE's own settings, exactly those of that SAE trained alone (its
    # ``name`` is the SAE's name within the group). Empty for a single-SAE run.
    group: tuple[RunSettings, ...] = ()

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
                    # Only a group has the key, so a single run's config (and hash) is as before.
                    # Its SAEs share [resilience] and [logger]; by position, so that the
                    # harmless fields below stay harmless per SAE ("group.3.runner.device").
                    **({"group": {str(i): _member_part(m) for i, m in enumerate(self.group)}} if self.group else {}),
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
            raise RunConfigError(f"{self.source}: {one_line(str(exc))}") from exc


# Fields that may change between launches of the same run without making the resume wrong.
HARMLESS_PREFIXES = (
    "resilience.checkpoint_every_seconds",
    "resilience.checkpoint_every_tokens",
    "resilience.keep_last",
    "resilience.mirror",
    "resilience.status_every_seconds",
    "logger.",
    "runner.verbose",
    # Read by neither SAELens nor lenslab to make the data: the dataset's columns decide.
    "runner.is_dataset_tokenized",
    "runner.hook_eval",
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
    return {k: v for k, v in flatten(comparable).items() if not _harmless(k)}


def _harmless(key: str) -> bool:
    if key.startswith("group."):  # group.<index>.<field of that SAE>
        key = key.split(".", 2)[-1]
    return key.startswith(HARMLESS_PREFIXES)


def _member_part(member: RunSettings) -> dict[str, Any]:
    return {k: v for k, v in member.comparable().items() if k not in ("resilience", "logger")}


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
    if "saes" in raw or "sweep" in raw:
        from lenslab_workspace.train.group_config import load_group

        return load_group(source, raw)
    return settings_from_raw(source, raw)


def settings_from_raw(source: Path, raw: dict[str, Any]) -> RunSettings:
    """Validate one SAE's run file, already read as TOML."""
    try:
        run = RunFile.model_validate(raw)
    except pydantic.ValidationError as exc:
        raise RunConfigError(f"{source}: {describe(exc)}") from exc
    if "sae" not in raw:
        raise RunConfigError(f"{source}: field 'sae': is required (the [sae] table: architecture, d_in, d_sae, ...)")

    runner_fields = validate_dataclass_fields(source, "", runner_field_types(), dict(run.model_extra or {}))
    check_refused(source, runner_fields)
    notes = replaced_notes(runner_fields)
    for key in REPLACED.keys() & runner_fields.keys():
        runner_fields.pop(key)

    sae_raw = dict(run.sae)
    architecture = sae_raw.pop("architecture", "standard")
    architectures = sae_field_types()
    if architecture not in architectures:
        raise RunConfigError(
            f"{source}: field 'sae.architecture': unknown architecture {architecture!r}; "
            f"choose one of {', '.join(sorted(architectures))}"
        )
    sae_raw.setdefault("device", runner_fields.get("device", "cpu"))
    sae_fields = validate_dataclass_fields(source, "sae.", architectures[architecture], sae_raw)
    logger_fields = _logger_fields(source, run.logger)

    _check_ranges(source, architecture, runner_fields, sae_fields)
    tiny_random = _tiny_random(source, runner_fields, run.tiny_random)
    _resolve_dataset_path(source, runner_fields)

    return RunSettings(
        source=source,
        name=run.name,
        architecture=architecture,
        runner_fields=runner_fields,
        sae_fields=sae_fields,
        logger_fields=logger_fields,
        resilience=run.resilience,
        tiny_random=tiny_random,
        notes=tuple(notes),
    )


def _tiny_random(source: Path, runner: dict[str, Any], tiny: TinyRandomConfig | None) -> TinyRandomConfig | None:
    """The tiny-random model's config, its seed resolved (the run's ``seed`` unless given)."""
    if runner.get("model_name") != TINY_RANDOM_MODEL:
        return tiny
    if runner.get("use_chat_formatting"):
        raise RunConfigError(
            f"{source}: field 'use_chat_formatting': the tiny-random model has no chat template (its tokens "
            "are UTF-8 bytes); set it to false, or use a model whose tokenizer has a chat template"
        )
    tiny = tiny or TinyRandomConfig()
    if tiny.seed is None:
        tiny = tiny.model_copy(update={"seed": runner.get("seed", SAELENS_SEED)})
    return tiny


# --- [logger]: SAELens's LoggingConfig --------------------------------------------------------


def _logger_fields(source: Path, raw: dict[str, Any]) -> dict[str, Any]:
    """The ``[logger]`` table, validated against SAELens's ``LoggingConfig``."""
    logger_raw = {"log_to_wandb": False, **raw}
    logger_fields = validate_dataclass_fields(source, "logger.", logger_field_types(), logger_raw)
    from lenslab_workspace.train.wandb_log import check_logger_fields  # imports no wandb

    check_logger_fields(source, logger_fields)
    return logger_fields


# --- ranges and paths -------------------------------------------------------------------------


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
