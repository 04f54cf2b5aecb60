"""``lenslab export skypilot``: a run file as a SkyPilot task that ``sky jobs launch`` recovers.

SkyPilot relaunches a managed job after a preemption (or an exit code it is told to recover
from) on whatever machine it finds next, and leaves resuming to the job. lenslab's exact resume
is that half: the task's ``run`` trains with ``lenslab-train`` under a run name derived from
``SKYPILOT_TASK_ID`` (which a managed job keeps across its recoveries), and the run's checkpoints
go to the runs mirror (``[box] mirror``), from which the fresh machine restores them.

The mirror is opened by lenslab-train itself (s3fs), not mounted by SkyPilot: its restore checks
every file against the checkpoint's manifest and moves only on the mirror's ``latest`` pointer,
and an S3-compatible mirror with its own endpoint is no SkyPilot store. Its credentials (the
variables ``[box] mirror_env`` names) are task ``secrets`` without values: ``sky jobs launch
--secret NAME`` fills each from the launching shell, so no value is ever in the file.

Nothing here imports SkyPilot: the task is written as YAML text (``lenslab.export.yamltext``).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, TYPE_CHECKING

from lenslab import contract, runmirror
from lenslab.errors import ConfigError, LenslabError
from lenslab.export import yamltext

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

if TYPE_CHECKING:
    from lenslab.config import Config
    from lenslab.runfile import RunFile

# lenslab's providers that are clouds SkyPilot launches on, by SkyPilot's names for them. A box
# you bring (ssh, local) or a Slurm cluster has nothing to map to.
CLOUDS = {"lambda": "lambda", "runpod": "runpod", "vast": "vast"}
# A Lambda instance type named exactly (gpu_1x_a100_sxm4) is a SkyPilot instance type there.
_LAMBDA_INSTANCE_TYPE = re.compile(r"gpu_\d+x_[a-z0-9_]+")
# The mirror schemes the task's setup installs a filesystem for (s3fs: any S3-compatible store).
MIRROR_SCHEMES = ("s3://",)
# Disk for the machine: the OS image, a venv with CUDA torch and the model's cache, plus the
# headroom lenslab.toml asks for (min_free_gb).
BASE_DISK_GB = 64
# Where things live on the machine SkyPilot gives the task, relative to its home directory: the
# task names one cloud, whose machines all have the same user and home, so a recovered job finds
# the run file and its dataset at the same absolute paths (lenslab-train resumes only a run whose
# config, with its dataset's resolved path, is the checkpoint's).
HOME_DIR = ".lenslab"
SOURCES_TARBALL = f"{HOME_DIR}/lenslab-src.tar.gz"
VENV = f"{HOME_DIR}/venv"
RUN_DIR = f"{HOME_DIR}/run"
RUNS_DIR = f"{HOME_DIR}/runs"
# The run name on the machine: "<prefix>-<12 hex digits of SKYPILOT_TASK_ID's sha256>".
KEY_HEX = 12
PREFIX_MAX = 64 - 1 - KEY_HEX
HEREDOC_END = "LENSLAB_RUN_FILE"

_SETUP = """\
set -euo pipefail
# lenslab and lenslab-workspace from the sources beside the task, into a venv that sees the
# image's own packages (a cloud image's CUDA torch is used, not downloaded again).
venv="$HOME/{venv}"
src=$(mktemp -d)
tar -xzf "$HOME/{tarball}" -C "$src"
python3 -m venv --system-site-packages "$venv"
"$venv/bin/python" -m pip install --disable-pip-version-check --no-input "$src" "$src/workspace[s3]"
rm -rf "$src"
"$venv/bin/lenslab-train" --help > /dev/null
"""

_RUN = """\
set -euo pipefail
: "${{SKYPILOT_TASK_ID:?is set by SkyPilot: launch this task with sky jobs launch}}"
export PATH="$HOME/{venv}/bin:$PATH"
# The run key: a managed job keeps SKYPILOT_TASK_ID across its recoveries, so every machine it
# lands on trains the same run, and restores that run's newest checkpoint from the mirror.
key=$(printf '%s' "$SKYPILOT_TASK_ID" | sha256sum | cut -c1-{key_hex})
run_name="$LENSLAB_RUN_PREFIX-$key"
mkdir -p "$HOME/{run_dir}"
run_file="$HOME/{run_dir}/{file_name}"
{{
  printf 'name = "%s"\\n' "$run_name"
  cat <<'{end}'
{body}{end}
}} > "$run_file"
echo "lenslab: run $run_name (SKYPILOT_TASK_ID=$SKYPILOT_TASK_ID), checkpoints mirrored to "{mirror} >&2
exec lenslab-train "$run_file" --runs-dir "$HOME/{runs_dir}"
"""


@dataclasses.dataclass(frozen=True)
class Exported:
    task: Path
    sources: Path
    run_prefix: str
    mirror: str
    secrets: list[str]

    def launch_command(self) -> str:
        flags = "".join(f" --secret {name}" for name in self.secrets)
        return f"sky jobs launch {shlex.quote(str(self.task))}{flags}"


def export(cfg: Config, run: RunFile, out: Path, gpus: int) -> Exported:
    """Write the task for ``run`` to ``out`` (and lenslab's sources beside it); everything is
    checked before anything is written, and a failed write leaves nothing behind."""
    from lenslab.remote import stockbox

    cloud = _cloud(cfg)
    mirrored = runmirror.with_box_mirror(run, cfg.box)
    mirror = _mirror(cfg, mirrored)
    context = stockbox.source_context(cfg)
    sources = out.parent / f"{stockbox.stamp(context)}.tar.gz"
    prefix = run.name[:PREFIX_MAX]
    task = {
        "name": prefix,
        "resources": _resources(cfg, cloud, gpus),
        "envs": {"LENSLAB_RUN_PREFIX": prefix},
        **({"secrets": dict.fromkeys(cfg.box.mirror_env)} if cfg.box.mirror_env else {}),
        "file_mounts": _file_mounts(run, sources),
        "setup": _SETUP.format(venv=VENV, tarball=SOURCES_TARBALL),
        "run": run_script(mirrored, mirror),
    }
    exported = Exported(out, sources, prefix, mirror, list(cfg.box.mirror_env))
    text = yamltext.dump(task, _header(exported, run))  # type: ignore[arg-type]
    _write(out, sources, text, lambda: stockbox.tarball(context))
    return exported


def _cloud(cfg: Config) -> str:
    cloud = CLOUDS.get(cfg.box.provider)
    if cloud is None:
        raise ConfigError(
            f"{cfg.path}: box.provider {cfg.box.provider!r} has no SkyPilot cloud to map to",
            f"set provider to one of {', '.join(CLOUDS)} in a lenslab.toml for the export",
        )
    return cloud


def _mirror(cfg: Config, run: RunFile) -> str:
    mirror = runmirror.run_mirror(run)
    if mirror is None:
        raise ConfigError(
            f"{cfg.path}: no runs mirror: a recovered job lands on a new machine and restores from it",
            'set mirror = "s3://BUCKET/PREFIX" in [box] (and mirror_env = ["AWS_ACCESS_KEY_ID", ...])',
        )
    if not mirror.startswith(MIRROR_SCHEMES):
        raise ConfigError(
            f"{run.path}: the mirror {mirror!r} is not S3-compatible; the task installs s3fs only",
            "use an s3:// mirror (any S3-compatible store; name its endpoint variable in mirror_env)",
        )
    return mirror


def _resources(cfg: Config, cloud: str, gpus: int) -> dict[str, yamltext.Value]:
    """SkyPilot resources: the cloud, disk and recovery for all; GPU types (in lenslab.toml's
    order of preference), regions and spot as ``ordered`` candidates when there are several."""
    box = cfg.box
    spot = [True, False] if box.interruptible and box.fallback == "on-demand" else [box.interruptible]
    kinds: list[dict[str, yamltext.Value]] = [{}]
    if box.gpu != "none":
        kinds = [_accelerator(cloud, name, gpus) for name in box.gpu_types]
    regions: list[str | None] = [*box.regions] if box.regions else [None]
    candidates = [
        {**kind, **({"region": region} if region else {}), "use_spot": use_spot}
        for use_spot in spot
        for kind in kinds
        for region in regions
    ]
    # lenslab-train exits 75 when stopped with a checkpoint saved: running it again continues.
    common: dict[str, yamltext.Value] = {
        "cloud": cloud,
        "disk_size": BASE_DISK_GB + box.min_free_gb,
        "job_recovery": {"recover_on_exit_codes": [contract.EXIT_INTERRUPTED]},
    }
    if len(candidates) == 1:
        return {**common, **candidates[0]}
    return {**common, "ordered": list(candidates)}


def _accelerator(cloud: str, name: str, gpus: int) -> dict[str, yamltext.Value]:
    if cloud == "lambda" and _LAMBDA_INSTANCE_TYPE.fullmatch(name):
        return {"instance_type": name}
    return {"accelerators": f"{name}:{gpus}"}


def _file_mounts(run: RunFile, sources: Path) -> dict[str, yamltext.Value]:
    mounts: dict[str, yamltext.Value] = {f"~/{SOURCES_TARBALL}": str(sources.resolve())}
    if run.dataset:
        local = (run.path.parent / run.dataset).resolve()
        mounts[f"~/{RUN_DIR}/{Path(run.dataset).as_posix()}"] = str(local)
    return mounts


def run_script(run: RunFile, mirror: str) -> str:
    """The task's ``run``: the run file (its name set from SKYPILOT_TASK_ID), then lenslab-train."""
    line = f'name = "{run.name}"'
    body = re.sub(rf"^{re.escape(line)}[ \t]*(\n|$)", "", run.text, count=1, flags=re.MULTILINE)
    if tomllib.loads(f"{line}\n{body}") != tomllib.loads(run.text):
        raise ConfigError(f"{run.path}: cannot set the run's name in it", 'write name = "..." as a top-level line')
    if HEREDOC_END in body.splitlines():
        raise ConfigError(f"{run.path}: a line of it is {HEREDOC_END}", "remove that line")
    body = body if body.endswith("\n") or not body else body + "\n"
    return _RUN.format(
        venv=VENV,
        key_hex=KEY_HEX,
        run_dir=RUN_DIR,
        file_name=run.path.name,
        end=HEREDOC_END,
        body=body,
        mirror=shlex.quote(mirror),
        runs_dir=RUNS_DIR,
    )


def _header(exported: Exported, run: RunFile) -> str:
    secrets = (
        f"The mirror's credentials ({', '.join(exported.secrets)}) are not in this file: each\n"
        "--secret NAME takes its value from the launching shell's environment.\n"
        if exported.secrets
        else "No mirror credentials are passed (box.mirror_env is empty): the machine's own are used.\n"
    )
    return (
        f"SkyPilot task for lenslab run {run.name!r}, written by `lenslab export skypilot`.\n"
        f"Launch it as a managed job (recovered after preemption, resumed exactly from {exported.mirror}):\n"
        f"  sky jobs launch {exported.task.name}{''.join(f' --secret {n}' for n in exported.secrets)}\n"
        f"{secrets}"
        f"Its setup installs lenslab from {exported.sources.name} (lenslab's sources, beside this file)."
    )


def _write(out: Path, sources: Path, text: str, tarball: Callable[[], bytes]) -> None:
    """The sources (when not there already) and the task, each through a temporary file."""
    if out.is_dir():
        raise ConfigError(f"{out}: is a directory", "name the task file to write (-o task.yaml)")
    if not out.parent.is_dir():
        raise ConfigError(f"{out.parent}: no such directory", "create it, or write the task elsewhere (-o)")
    made = not sources.is_file()
    try:
        if made:
            with _replacing(sources) as handle:
                handle.write(tarball())
        with _replacing(out) as handle:
            handle.write(text.encode())
    except OSError as exc:
        if made:
            with suppress(OSError):
                sources.unlink()
        raise LenslabError(f"cannot write {out} ({exc.strerror})", "write it where you can write files (-o)") from exc


@contextmanager
def _replacing(path: Path) -> Iterator[IO[bytes]]:
    """A temporary file beside ``path`` that replaces it once written in full."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
        os.chmod(name, 0o644)
        os.replace(name, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(name)
        raise
