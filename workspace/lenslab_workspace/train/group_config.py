"""A group run file: several SAEs trained from one forward pass of the model per batch.

Two ways to write one (not both in one file):

    [[saes]]                 one table per SAE: ``name`` (optional; ``sae-<i>`` otherwise),
    name = "wide"            ``architecture`` and the architecture's fields, and any of the
    architecture = "topk"    fields that may differ per SAE (``PER_SAE_FIELDS``: its own
    d_in = 768               ``hook_name`` on the same model, ``lr`` and its schedule, Adam's
    d_sae = 24576            betas, the sparsity windows, ``from_pretrained_path``). ``[sae]``,
    k = 64                   if given, holds defaults for every entry.
    lr = 1e-4

    [sweep]                  a grid: every combination of the listed values, applied over
    d_sae = [8192, 16384]    ``[sae]`` (SAE fields) or the top level (``PER_SAE_FIELDS``);
    lr = [1e-4, 3e-4]        each SAE is named after its values (``d_sae-8192_lr-0.0001``).

Everything else (model, dataset, ``training_tokens``, batch sizes, ``seed``, the mixing
buffer) is shared: the SAEs step in lockstep on the same model pass. Each SAE's settings are
exactly those of a run file that trains that SAE alone (``RunSettings.group``), and it is
trained on exactly that run's batches.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from pathlib import Path
from typing import Any

from lenslab.contract import RUN_NAME_HELP, is_run_name
from lenslab_workspace.train.config import RunSettings, settings_from_raw
from lenslab_workspace.train.errors import RunConfigError
from lenslab_workspace.train.fieldtypes import runner_field_types

# Top-level fields each SAE of a group may set for itself: they change what its trainer does
# with a batch, never which batches the shared model pass makes.
PER_SAE_FIELDS = (
    "hook_name",
    "lr",
    "lr_end",
    "lr_scheduler_name",
    "lr_warm_up_steps",
    "lr_decay_steps",
    "n_restart_cycles",
    "adam_beta1",
    "adam_beta2",
    "dead_feature_window",
    "feature_sampling_window",
    "dead_feature_threshold",
    "from_pretrained_path",  # the SAE it continues (checked against its own [sae] fields)
)
# status.json lists each SAE and the laptop reads at most 64 KiB of it: 64 SAEs fit with room.
MAX_GROUP = 64
# Settings a group refuses (one line each): what lenslab does not yet do for several SAEs.
GROUP_REFUSED = {
    "from_pretrained_path": "set it in the [[saes]] table of each SAE that continues a saved one",
}


def load_group(source: Path, raw: dict[str, Any]) -> RunSettings:
    """The group's settings: the first SAE's, named after the run, with every SAE in ``group``."""
    if "saes" in raw and "sweep" in raw:
        raise RunConfigError(f"{source}: give either [[saes]] tables or a [sweep] table, not both")
    base = {k: v for k, v in raw.items() if k not in ("saes", "sweep")}
    for key, why in GROUP_REFUSED.items():
        if base.get(key) not in (None, False, 0):
            raise RunConfigError(f"{source}: field '{key}': not a field of the whole group: {why}")
    entries = _entries_from_saes(source, raw["saes"]) if "saes" in raw else _entries_from_sweep(source, raw["sweep"])
    if not entries:
        raise RunConfigError(f"{source}: the group holds no SAE; add at least one [[saes]] table or sweep value")
    if len(entries) > MAX_GROUP:
        raise RunConfigError(f"{source}: the group holds {len(entries)} SAEs, more than {MAX_GROUP}; split it")
    members = tuple(_member(source, base, name, where, runner, sae) for name, where, runner, sae in entries)
    _check_hooks_agree(source, members)
    group_name = base.get("name")
    # The group's name is its run directory and its mirror prefix: checked as a run's name is.
    if not isinstance(group_name, str) or not is_run_name(group_name):
        raise RunConfigError(f"{source}: field 'name': {group_name!r} is not a valid run name; use {RUN_NAME_HELP}")
    first = members[0]
    return dataclasses.replace(first, source=source, name=str(group_name), group=members)


Entry = tuple[str, str, dict[str, Any], dict[str, Any]]  # name, where (for errors), runner, sae


def _entries_from_saes(source: Path, tables: Any) -> list[Entry]:
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise RunConfigError(f"{source}: field 'saes': must be an array of tables ([[saes]] sections)")
    entries: list[Entry] = []
    shared = {str(f) for f in runner_field_types()} - set(PER_SAE_FIELDS)
    for index, table in enumerate(tables):
        table = dict(table)
        name = table.pop("name", f"sae-{index}")
        where = f"saes[{index}]"
        for key in table:
            if key in shared:
                raise RunConfigError(
                    f"{source}: field '{where}.{key}': shared by every SAE of the group (one model pass feeds "
                    f"them in lockstep); set it at the top level. Per SAE: {', '.join(PER_SAE_FIELDS)}"
                )
        runner = {k: table.pop(k) for k in PER_SAE_FIELDS if k in table}
        entries.append((name, where, runner, table))
    return entries


def _entries_from_sweep(source: Path, grid: Any) -> list[Entry]:
    if not isinstance(grid, dict) or not grid:
        raise RunConfigError(f"{source}: field 'sweep': must be a table of field = [values, ...]")
    shared = {str(f) for f in runner_field_types()} - set(PER_SAE_FIELDS)
    for key, values in grid.items():
        if key in shared or key == "name":
            raise RunConfigError(
                f"{source}: field 'sweep.{key}': cannot be swept (the SAEs of a group share it); sweep SAE fields "
                f"or {', '.join(PER_SAE_FIELDS)}"
            )
        if not isinstance(values, list) or not values:
            raise RunConfigError(
                f"{source}: field 'sweep.{key}': must be a non-empty array of values, e.g. {key} = [1, 2]"
            )
        if len(set(map(repr, values))) != len(values):
            raise RunConfigError(f"{source}: field 'sweep.{key}': lists a value twice; list each value once")
    entries: list[Entry] = []
    for combo in itertools.product(*grid.values()):
        values = dict(zip(grid, combo, strict=True))
        name = _sweep_name(values)
        runner = {k: v for k, v in values.items() if k in PER_SAE_FIELDS}
        sae = {k: v for k, v in values.items() if k not in PER_SAE_FIELDS}
        entries.append((name, f"sweep ({name})", runner, sae))
    return entries


def _sweep_name(values: dict[str, Any]) -> str:
    """``d_sae-8192_lr-0.0001``: readable, and a valid file name (other characters become '-')."""
    text = "_".join(f"{key}-{value}" for key, value in values.items())
    return re.sub(r"[^A-Za-z0-9._-]", "-", text)[:64].rstrip("-_.") or "sae"


def _member(
    source: Path, base: dict[str, Any], name: Any, where: str, runner: dict[str, Any], sae: dict[str, Any]
) -> RunSettings:
    """One SAE's settings: what a run file training it alone would give."""
    if not isinstance(name, str) or not is_run_name(name):
        raise RunConfigError(f"{source}: field '{where}.name': {name!r} is not a valid SAE name; use {RUN_NAME_HELP}")
    defaults = base.get("sae", {})
    if not isinstance(defaults, dict):
        raise RunConfigError(f"{source}: field 'sae': must be a table")
    raw = {**base, **runner, "name": name, "sae": {**defaults, **sae}}
    try:
        return settings_from_raw(source, raw)
    except RunConfigError as exc:
        message = str(exc).removeprefix(f"{source}: ")
        raise RunConfigError(f"{source}: {where} ('{name}'): {message}") from exc


def _check_hooks_agree(source: Path, members: tuple[RunSettings, ...]) -> None:
    seen: dict[str, RunSettings] = {}
    names: set[str] = set()
    for member in members:
        if member.name in names:
            raise RunConfigError(f"{source}: two SAEs are named '{member.name}'; give each a different name")
        names.add(member.name)
        hook = member.runner_fields.get("hook_name", "blocks.0.hook_mlp_out")
        other = seen.setdefault(hook, member)
        if other.sae_fields["d_in"] != member.sae_fields["d_in"]:
            raise RunConfigError(
                f"{source}: SAEs '{other.name}' and '{member.name}' read hook {hook!r} with different d_in "
                f"({other.sae_fields['d_in']} and {member.sae_fields['d_in']}); one hook has one width"
            )
