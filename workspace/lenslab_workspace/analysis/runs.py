"""A finished (or checkpointed) run, opened for evaluation: its settings, language model, SAE
and the tokens to evaluate on.

Held-out tokens come from the run's own dataset, after the sequences the trainer tokenized for
training (``sequences_needed``: everything a run can read). When the dataset has nothing past
those (a small corpus that the run read for several epochs), the last rows of the run's own
token array are used instead and ``held_out`` is false; ``--dataset`` gives other text.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from lenslab.contract import FINAL_DIR, RUN_CONFIG_FILE, is_checkpoint_name
from lenslab_workspace.train.errors import LenslabTrainError

log = logging.getLogger("lenslab.eval")


class EvalError(LenslabTrainError):
    """A problem with the input of lenslab-eval: one line, exit 2."""

    exit_code = 2


@dataclasses.dataclass
class OpenedRun:
    root: Path
    settings: Any  # lenslab_workspace.train.config.RunSettings
    model: Any
    tokenizer: Any
    tokenizer_name: str
    device: str

    @property
    def runner(self) -> dict[str, Any]:
        fields: dict[str, Any] = self.settings.runner_fields
        return fields

    @property
    def context_size(self) -> int:
        return int(self.runner.get("context_size", 128))


@dataclasses.dataclass
class EvalTokens:
    rows: np.ndarray  # (sequences, context_size) int64
    source: str  # what they are, for metrics.json and the report
    held_out: bool


def open_run(root: Path, device: str | None = None) -> OpenedRun:
    """Read ``run-config.json`` and load the run's language model on ``device``."""
    from lenslab_workspace.train.config import ResilienceConfig, RunSettings, TinyRandomConfig
    from lenslab_workspace.train.models import load_language_model

    config_file = root / RUN_CONFIG_FILE
    if not root.is_dir():
        raise EvalError(f"no run directory {root}; pass the directory lenslab-train wrote (runs/<name>)")
    if not config_file.is_file():
        raise EvalError(f"{root} is not a lenslab run: no {RUN_CONFIG_FILE}; pass runs/<name>")
    try:
        saved = json.loads(config_file.read_text())
        settings = RunSettings(
            source=config_file,
            name=saved["name"],
            architecture=saved["architecture"],
            runner_fields=saved["runner"],
            sae_fields=saved["sae"],
            logger_fields=saved.get("logger") or {},
            resilience=ResilienceConfig(**(saved.get("resilience") or {})),
            tiny_random=TinyRandomConfig(**saved["tiny_random"]) if saved.get("tiny_random") else None,
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise EvalError(f"{config_file}: unreadable run config ({exc}); it is written by lenslab-train") from exc
    chosen = device or _default_device(str(settings.runner_fields.get("device", "cpu")))
    model, tokenizer, tokenizer_name = load_language_model(settings, chosen)
    return OpenedRun(root, settings, model, tokenizer, tokenizer_name, chosen)


def _default_device(configured: str) -> str:
    import torch

    if configured.startswith("cuda") and not torch.cuda.is_available():
        return "cpu"
    return configured


def find_sae(root: Path, explicit: Path | None) -> Path:
    """``--sae``, else ``final/``, else the newest checkpoint that has SAE weights."""
    if explicit is not None:
        if not (explicit / "cfg.json").is_file():
            raise EvalError(f"--sae {explicit}: not an SAE directory (no cfg.json); pass final/ or a checkpoint")
        return explicit
    final = root / FINAL_DIR
    if (final / "cfg.json").is_file():
        return final
    checkpoints = root / "checkpoints"
    steps = sorted(
        (p for p in checkpoints.iterdir() if is_checkpoint_name(p.name) and (p / "manifest.json").is_file()),
        reverse=True,
    ) if checkpoints.is_dir() else []  # fmt: skip
    if not steps:
        raise EvalError(f"run {root.name} has no final SAE and no checkpoint yet; wait for training or pass --sae")
    log.warning("run %s has not finished; evaluating its newest checkpoint %s", root.name, steps[0].name)
    return steps[0]


def load_sae(path: Path, device: str) -> tuple[Any, Any]:
    """The SAE at ``path`` and the activation scaler it expects (identity for ``final/``)."""
    from sae_lens import SAE
    from sae_lens.training.activation_scaler import ActivationScaler

    from lenslab_workspace.train.errors import CheckpointError
    from lenslab_workspace.train.state import load_state_file

    try:
        with warnings.catch_warnings():
            # SAELens suggests a loading style for hub models; lenslab loads the run's own model.
            warnings.simplefilter("ignore", UserWarning)
            sae = SAE.load_from_disk(str(path), device=device)
    except Exception as exc:  # safetensors/json/config errors all mean: not a loadable SAE
        raise EvalError(f"{path}: cannot load the SAE: {' '.join(str(exc).split())[:200]}") from exc
    sae.eval()
    scaler = ActivationScaler()
    state_file = path / "lenslab_state.pt"
    if state_file.is_file():
        # A checkpoint's weights are not yet folded with the norm scaling factor. Read as data
        # only: a checkpoint may come from a mirror, and unpickling it could run its code.
        try:
            scaler_state = load_state_file(state_file).get("scaler", {})
        except CheckpointError as exc:
            raise EvalError(f"{path}: {exc}; evaluate the run's final/ SAE or another checkpoint") from exc
        if not isinstance(scaler_state, dict):
            raise EvalError(f"{state_file}: not a lenslab state file; evaluate the run's final/ SAE instead")
        if scaler_state.get("whitening") is not None:
            raise EvalError(f"{path}: a whitened checkpoint; evaluate the run's final/ SAE instead")
        scaler.scaling_factor = scaler_state.get("scaling_factor")
    return sae, scaler


def special_tokens(run: OpenedRun) -> list[int]:
    """Tokens left out of metrics and top contexts, as SAELens's run_evals leaves them out."""
    from lenslab_workspace.train.data import ByteTokenizer

    if run.tokenizer is None:
        return []
    if isinstance(run.tokenizer, ByteTokenizer):
        return [run.tokenizer.bos_token_id]
    from sae_lens.util import get_special_token_ids

    return list(get_special_token_ids(run.tokenizer))


def eval_tokens(run: OpenedRun, n_tokens: int, dataset: str | None) -> EvalTokens:
    """``n_tokens`` (rounded up to whole sequences) of held-out text, or of ``dataset``."""
    from lenslab_workspace.train.data import materialize_tokens, sequences_needed
    from lenslab_workspace.train.errors import DataError
    from lenslab_workspace.train.runner import build_exclude_tokens

    n_rows = max(1, -(-n_tokens // run.context_size))
    runner = dict(run.runner)
    # The installed `datasets` runs no loading scripts; asking for them only logs an error line.
    runner["dataset_trust_remote_code"] = False
    if dataset is not None:
        runner["dataset_path"] = str(Path(dataset).resolve()) if Path(dataset).exists() else dataset
    _check_local_dataset(str(runner["dataset_path"]), "--dataset" if dataset is not None else "the run's dataset")
    try:
        if dataset is not None:
            rows = _take_sequences(run, runner, skip=0, count=n_rows)
            return _enough(EvalTokens(rows, f"dataset {dataset}", True), n_rows, run)
        used = sequences_needed(runner, run.context_size)
        # The same rows the trainer stored (same key): with exclude_special_tokens it stores more
        # than `used`, to replace the dropped positions, and held-out text starts after all of them.
        exclude = build_exclude_tokens(runner, run.tokenizer)
        array = materialize_tokens(
            runner, run.model, run.tokenizer, run.root / "data", run.tokenizer_name, used, exclude_tokens=exclude
        )
        stored = array.shape[0]
        if stored >= used:  # the dataset goes on past what training could read
            rows = _take_sequences(run, runner, skip=stored, count=n_rows)
            if rows.shape[0] >= n_rows:
                return EvalTokens(rows, f"held-out sequences {stored}..{stored + n_rows} of the run's dataset", True)
    except DataError as exc:
        raise EvalError(f"dataset missing or unreadable: {exc}; pass --dataset PATH_OR_NAME") from exc
    start = max(0, array.shape[0] - n_rows)
    tail = np.asarray(array[start:], dtype=np.int64)
    tokens = _enough(
        EvalTokens(tail, f"training sequences {start}..{array.shape[0]} (no held-out data)", False), n_rows, run
    )
    log.warning(
        "the run read every sequence of its dataset; evaluating on its last %d training sequences "
        "(pass --dataset for held-out text)",
        n_rows,
    )
    return tokens


def _check_local_dataset(path: str, what: str) -> None:
    """A path that is not there is a missing file, not a Hugging Face name to look up."""
    looks_local = path.startswith(("/", "./", "../", "~")) or Path(path).suffix in (
        ".jsonl",
        ".json",
        ".parquet",
        ".arrow",
    )
    if looks_local and not Path(path).expanduser().exists():
        raise EvalError(f"dataset missing: {what} {path} does not exist; pass --dataset with an existing file or a "
                        "Hugging Face dataset name")  # fmt: skip


def _enough(tokens: EvalTokens, n_rows: int, run: OpenedRun) -> EvalTokens:
    if tokens.rows.shape[0] < n_rows:
        have = tokens.rows.shape[0] * run.context_size
        raise EvalError(
            f"too few tokens: {tokens.source} has {have:,}, fewer than the {n_rows * run.context_size:,} asked for; "
            "lower --tokens or pass a bigger --dataset"
        )
    return tokens


def _take_sequences(run: OpenedRun, runner: dict[str, Any], skip: int, count: int) -> np.ndarray:
    """Sequences ``skip .. skip + count`` of the dataset, made exactly as the trainer makes them."""
    from lenslab_workspace.train.data import iterate_sequences

    rows = []
    for index, sequence in enumerate(iterate_sequences(runner, run.model, run.tokenizer)):
        if index >= skip:
            rows.append(sequence.numpy().astype(np.int64))
        if len(rows) >= count:
            break
    if not rows:
        return np.zeros((0, run.context_size), dtype=np.int64)
    return np.stack(rows)
