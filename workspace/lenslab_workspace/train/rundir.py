"""The stable layout of one run under the runs root (``--runs-dir``, default ``./runs``).

runs/<name>/
  run-config.json          the resolved config, pinned when the first checkpoint commits
                           (resume compares to it)
  status.json              live status, replaced atomically (schema: status.py)
  train.log                plain log lines, appended by every launch
  data/tokens-<hash>.npy   the tokenized dataset, fixed-length rows (O(1) positioning),
                           keyed by the dataset's content (sha256, cached in dataset-hashes.json)
  crash-<time>.log         the traceback of a launch that failed unexpectedly
  checkpoints/step-000000123/   committed checkpoints (manifest.json written last)
  checkpoints/.tmp-*            unfinished writes; never loaded, removed at start
  checkpoints/.refused-step-*   checkpoints whose state files would not load as data only
  final/                   the finished SAE in SAELens's format (SAE.load_from_disk)
  wandb-run.json           the wandb run id, with [logger] log_to_wandb (also in each
                           checkpoint's wandb.json, with its newest records)
  wandb/                   wandb's own files (offline runs to `wandb sync`)
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

STEP_DIR_PREFIX = "step-"
TMP_PREFIX = ".tmp-"


@dataclasses.dataclass(frozen=True)
class RunDir:
    root: Path

    @classmethod
    def for_run(cls, runs_dir: Path, name: str) -> RunDir:
        return cls(runs_dir / name)

    @property
    def config_file(self) -> Path:
        return self.root / "run-config.json"

    @property
    def status_file(self) -> Path:
        return self.root / "status.json"

    @property
    def log_file(self) -> Path:
        return self.root / "train.log"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def final(self) -> Path:
        return self.root / "final"

    def create(self) -> None:
        for path in (self.root, self.data_dir, self.checkpoints):
            path.mkdir(parents=True, exist_ok=True)

    def is_empty(self) -> bool:
        return not self.root.exists() or not any(self.root.iterdir())

    def set_aside(self) -> Path:
        """Rename the run out of the way for ``--fresh``; nothing is deleted."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        target = self.root.with_name(f"{self.root.name}.old-{stamp}")
        counter = 1
        while target.exists():
            counter += 1
            target = self.root.with_name(f"{self.root.name}.old-{stamp}-{counter}")
        self.root.rename(target)
        return target


def step_dir_name(step: int) -> str:
    return f"{STEP_DIR_PREFIX}{step:09d}"
