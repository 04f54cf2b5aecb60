"""The contract the laptop and the box share, written once.

Dependency-free on purpose: the ``lenslab`` CLI, lenslab-workspace's trainer (which imports
this module) and the box-side scripts all read these names, patterns and numbers, so a run
directory written by one side is understood by the other, and anything that does not match
is refused where it enters.
"""

from __future__ import annotations

import re

# A run's name: its directory under runs/, its container's name suffix, its mirror prefix.
# One path component that cannot be "." or "..", start with "-" (an option) or hold a space.
RUN_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
RUN_NAME = re.compile(RUN_NAME_PATTERN)
RUN_NAME_HELP = "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"

# Inside a run directory.
RUNS_DIR = "runs"
STATUS_FILE = "status.json"
LOG_FILE = "train.log"
RUN_CONFIG_FILE = "run-config.json"
FINAL_DIR = "final"
CHECKPOINTS_DIR = "checkpoints"
MANIFEST_FILE = "manifest.json"
# A committed checkpoint's directory name (the step, zero-padded so names sort by step).
CHECKPOINT_NAME = re.compile(r"step-[0-9]{1,12}")
# Where the box placed a run on a box with GPUs ({"state": "placed"|"queued", "index", "uuid", ...}),
# and the GPU UUID it names (NVIDIA's "GPU-" and 32 hex digits grouped 8-4-4-4-12).
GPU_FILE = "gpu.json"
GPU_UUID = re.compile(r"GPU-[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
# Files inside a checkpoint or final/: flat, simple names only.
ARTIFACT_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

# lenslab-train's exit codes.
EXIT_FINISHED = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: stopped on request with a checkpoint saved; run again to continue
EXIT_SECOND_SIGNAL = 130

# How long a trainer gets between SIGTERM and SIGKILL to write its final checkpoint, for every
# stopper (`lenslab stop`, `lenslab down`, the autostop watcher).
STOP_TIMEOUT_SECONDS = 120

# The mirror's credentials for a run, beside its run file on the box (mode 600): a JSON object
# of environment variables (names as below) that lenslab-train sets before it opens the mirror.
MIRROR_ENV_FILE = ".mirror-env.json"
ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]{0,63}")

# Docker labels on everything lenslab starts on a box.
BOX_LABEL = "lenslab.box"
ROLE_LABEL = "lenslab.role"
RUN_LABEL = "lenslab.run"


def is_run_name(value: str) -> bool:
    return RUN_NAME.fullmatch(value) is not None


def is_checkpoint_name(value: str) -> bool:
    return CHECKPOINT_NAME.fullmatch(value) is not None


def is_artifact_file_name(value: str) -> bool:
    return ARTIFACT_FILE_NAME.fullmatch(value) is not None
