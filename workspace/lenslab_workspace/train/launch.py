"""Checks a launch makes before and right after building, and the run directory's lifecycle.

Before anything is written: the runs directory is usable, a resumed run's ``run-config.json``
matches, and the devices exist. Right after the language model is built: the hook exists and
is as wide as ``sae.d_in``. Each failure is one line naming ``--runs-dir`` or the run file's
field, so a refused launch leaves every run directory as it was.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import math
import os
import shutil
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from lenslab_workspace.train.config import RunSettings, changed_fields
from lenslab_workspace.train.errors import ConfigChangedError, RunConfigError
from lenslab_workspace.train.rundir import RunDir

log = logging.getLogger("lenslab.train")

DEVICE_FIELDS = ("device", "llm_device", "act_store_device")


def check_runs_dir(runs_dir: Path, run: RunDir) -> None:
    """The runs directory exists or can be made, and is a writable directory."""
    existing = runs_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    where = "" if existing == runs_dir else f" (its nearest existing parent {existing})"
    if not existing.is_dir():
        raise RunConfigError(f"--runs-dir {runs_dir}: {existing} is not a directory; pass a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunConfigError(f"--runs-dir {runs_dir}: not writable{where}; pass a directory you can write to")
    if run.root.exists() and not run.root.is_dir():
        raise RunConfigError(f"--runs-dir {runs_dir}: {run.root} is not a directory; move it away")


def read_run_config(run: RunDir) -> dict[str, Any] | None:
    """The pinned config of an existing run, or None; a damaged one is one line (exit 2)."""
    try:
        text = run.config_file.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise RunConfigError(f"{run.config_file}: cannot read it ({exc}); fix it, or start over with --fresh") from exc
    try:
        saved = json.loads(text)
    except ValueError as exc:
        raise RunConfigError(
            f"{run.config_file}: not valid JSON ({exc}); restore it, or start over with --fresh (the old run is kept)"
        ) from exc
    if not isinstance(saved, dict) or not isinstance(saved.get("runner", {}), dict):
        raise RunConfigError(
            f"{run.config_file}: not a lenslab run config; restore it, or start over with --fresh (the old run is kept)"
        )
    return saved


def check_config_unchanged(settings: RunSettings, run: RunDir) -> None:
    saved = read_run_config(run)
    if saved is None:
        return
    before, now = saved.get("runner", {}).get("device", "cpu"), settings.runner_fields.get("device", "cpu")
    if before != now:
        log.warning(
            "run '%s' started on %s and resumes on %s: it continues correctly, but the result will "
            "not be bit-identical to an uninterrupted run on one device",
            settings.name,
            before,
            now,
        )
    differing = changed_fields(saved, settings.comparable())
    if differing:
        raise ConfigChangedError(
            f"run '{settings.name}' was started with another config; these fields differ: {', '.join(differing)}. "
            f"Restore them, or start over with --fresh (the old run is kept), or use a new name"
        )


def check_devices(settings: RunSettings) -> None:
    """Every device the run names exists on this machine."""
    import torch

    named = [(f, settings.runner_fields.get(f)) for f in DEVICE_FIELDS]
    named.append(("sae.device", settings.sae_fields.get("device")))
    for field, value in named:
        if value is None or (field == "act_store_device" and value == "with_model"):
            continue  # "with_model": SAELens's legacy spelling of the model's device
        try:
            device = torch.device(value)
        except (RuntimeError, TypeError) as exc:
            raise RunConfigError(f"{settings.source}: field '{field}': {value!r} is not a device ({exc})") from exc
        if device.type == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if count == 0:
                raise RunConfigError(f"{settings.source}: field '{field}': {value!r}, but this machine has no CUDA GPU")
            if device.index is not None and device.index >= count:
                raise RunConfigError(
                    f"{settings.source}: field '{field}': {value!r}, but this machine has {count} GPU(s): "
                    f"cuda:0 to cuda:{count - 1}"
                )
        elif device.type == "mps" and not torch.backends.mps.is_available():
            raise RunConfigError(f"{settings.source}: field '{field}': 'mps', but MPS is not available here")
        elif device.type not in ("cpu", "cuda", "mps"):
            raise RunConfigError(f"{settings.source}: field '{field}': {value!r}: use cpu, cuda, cuda:N or mps")


def check_hook(settings: RunSettings, model: Any, d_in: int) -> None:
    """The hook exists on the built model and its activations are ``sae.d_in`` wide."""
    import torch
    from sae_lens.util import extract_stop_at_layer_from_tlens_hook_name

    runner, source = settings.runner_fields, settings.source
    hook = runner.get("hook_name", "blocks.0.hook_mlp_out")
    if not hasattr(model, "hook_dict") or not hasattr(model, "run_with_cache"):
        return  # not a TransformerLens model (e.g. a HookedProxyLM): SAELens checks it when it runs
    hooks = sorted(model.hook_dict)
    model_name = runner.get("model_name")
    if hook not in hooks:
        hint = difflib.get_close_matches(hook, hooks, n=1)
        suggestion = f" (did you mean {hint[0]!r}?)" if hint else f"; it has e.g. {', '.join(hooks[:3])}"
        raise RunConfigError(f"{source}: field 'hook_name': {model_name} has no hook {hook!r}{suggestion}")
    try:
        with torch.no_grad():
            probe = torch.zeros((1, 1), dtype=torch.long, device=model.cfg.device)
            _, cache = model.run_with_cache(
                probe,
                names_filter=[hook],
                stop_at_layer=extract_stop_at_layer_from_tlens_hook_name(hook),
                prepend_bos=False,
            )
    except Exception as exc:  # a model that cannot run one token is a model config problem
        raise RunConfigError(f"{source}: {model_name} cannot run ({' '.join(str(exc).split())[:200]})") from exc
    shape = tuple(cache[hook].shape)
    head = runner.get("hook_head_index")
    if head is not None:
        if len(shape) < 4 or not 0 <= head < shape[2]:
            heads = f"has {shape[2]} heads" if len(shape) >= 4 else "has no head dimension"
            raise RunConfigError(f"{source}: field 'hook_head_index': {head}, but {hook} {heads}")
        shape = shape[:2] + shape[3:]
    width = math.prod(shape[2:])
    if width != d_in:
        raise RunConfigError(
            f"{source}: field 'sae.d_in': {d_in}, but {hook} of {model_name} is {width} wide; set sae.d_in = {width}"
        )


def staging_dir(target: RunDir) -> RunDir:
    """Where ``--fresh`` builds the new run while the old one stays in place."""
    for stale in target.root.parent.glob(f".{target.root.name}.fresh-*"):
        if not _pid_alive(stale.name.rsplit("-", 1)[-1]):
            shutil.rmtree(stale, ignore_errors=True)
    return RunDir(target.root.with_name(f".{target.root.name}.fresh-{os.getpid()}"))


def _pid_alive(text: str) -> bool:
    try:
        os.kill(int(text), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def write_crash_log(exc: BaseException, run_root: Path | None, prefix: str = "lenslab-train-") -> Path:
    """The traceback, in the run directory when there is one, else in a new temporary directory."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    name = f"crash-{time.strftime('%Y%m%d-%H%M%S')}.log"
    if run_root is not None and run_root.is_dir():
        with contextlib.suppress(OSError):
            (run_root / name).write_text(text)
            return run_root / name
    path = Path(tempfile.mkdtemp(prefix=prefix)) / name
    path.write_text(text)
    return path
