"""The box's GPUs, as the NVIDIA driver's ``nvidia-smi`` lists them: what runs are placed on.

``nvidia-smi --query-gpu=index,uuid,name,memory.total --format=csv,noheader,nounits`` prints
one line per GPU, e.g. ``0, GPU-5f3c1e2a-1b2c-3d4e-5f60-718293a4b5c6, NVIDIA H100 80GB HBM3,
81559``. A box without the tool, or whose tool fails (no driver loaded), has no GPUs: its runs
share the machine as before, unplaced. A line that is not one GPU is skipped rather than
guessed at: a run is only ever pinned to a GPU named by its UUID.

Runs are pinned by UUID, not index: ``CUDA_VISIBLE_DEVICES=<index>`` counts in CUDA's order
(fastest first unless ``CUDA_DEVICE_ORDER=PCI_BUS_ID``), which may differ from nvidia-smi's.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

from lenslab.contract import GPU_UUID

QUERY = ("--query-gpu=index,uuid,name,memory.total", "--format=csv,noheader,nounits")
MAX_GPUS = 64
SMI_TIMEOUT_SECONDS = 20.0


@dataclass(frozen=True)
class Gpu:
    index: int  # nvidia-smi's index: what `lenslab runs` shows
    uuid: str  # what CUDA_VISIBLE_DEVICES names
    name: str
    memory_mib: int | None  # None when the driver reports none ("[N/A]")


def parse(text: str) -> list[Gpu]:
    """The GPUs in nvidia-smi's CSV answer; lines that are not one GPU, and repeats, skipped."""
    found: list[Gpu] = []
    for line in text.splitlines():
        gpu = _parse_line(line)
        if gpu is None or any(g.index == gpu.index or g.uuid == gpu.uuid for g in found):
            continue
        found.append(gpu)
        if len(found) == MAX_GPUS:
            break
    return sorted(found, key=lambda g: g.index)


def _parse_line(line: str) -> Gpu | None:
    parts = [part.strip() for part in line.split(",")]
    if len(parts) < 4:
        return None
    index, uuid, memory = parts[0], parts[1], parts[-1]
    name = ", ".join(parts[2:-1])  # a name with a comma in it stays whole
    if not index.isdigit() or int(index) >= MAX_GPUS or GPU_UUID.fullmatch(uuid) is None:
        return None
    if not name.isprintable() or not name:
        return None
    return Gpu(int(index), uuid, name[:200], int(memory) if memory.isdigit() else None)


def inventory(timeout: float = SMI_TIMEOUT_SECONDS) -> list[Gpu]:
    """This machine's GPUs; none when nvidia-smi is missing, fails or hangs."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        done = subprocess.run([smi, *QUERY], capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return []
    return parse(done.stdout) if done.returncode == 0 else []
