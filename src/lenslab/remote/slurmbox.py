"""The box side of `lenslab up`, `status` and `down` for a Slurm cluster's login node.

`up` checks, in one round trip, that the login node has Slurm's client commands (sbatch,
squeue, sinfo, scontrol) and that the persistent root on the shared file system is writable;
then it installs lenslab and lenslab-workspace into a venv ON THE SHARED ROOT
(``<root>/.lenslab/venv``), so every compute node runs the same lenslab-train. The venv is made
with ``--system-site-packages`` (the cluster's Python stack, torch included, is kept) from the
sources uploaded as one tarball, as for a stock container image (lenslab.remote.stockbox), and
holds a stamp of those sources: a later `up` whose stamp matches reuses it as it is.

Nothing here runs as root or starts a daemon: the login node is shared, and Slurm runs the jobs.
`down` cancels nothing (``stop_all``): the cluster and its queue are not lenslab's to stand down.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lenslab import values as values_
from lenslab.errors import BootstrapError, ConfigError
from lenslab.remote import stockbox

if TYPE_CHECKING:
    from pathlib import Path

    from lenslab.config import Config
    from lenslab.records import Box
    from lenslab.remote.bootstrap import Runner
    from lenslab.remote.labs import Progress

COMMANDS = ("sbatch", "squeue", "sinfo", "scontrol")
VENV = stockbox.VENV  # relative to the root: <root>/.lenslab/venv
STAMP_FILE = stockbox.STAMP_FILE
MAX_FACT_LINES = 500  # a cluster of thousands of nodes: `status` shows the first ones
LAYOUT = ("workspace", "checkpoints", "hf-cache", "runs", ".lenslab")

# One round trip: the root resolved, what is missing, the cluster's facts. `~` expands here.
_CHECK = """
root={root}
missing=""
for name in {commands}; do command -v "$name" >/dev/null 2>&1 || missing="$missing $name"; done
echo "missing:$missing"
mkdir -p "$root" 2>/dev/null || true
cd "$root" 2>/dev/null && printf 'root:%s\\n' "$(pwd -P)" || echo "root:"
[ -w "$root" ] && touch "$root/.lenslab-write-test" 2>/dev/null && rm -f "$root/.lenslab-write-test" \\
  && echo writable:yes || echo writable:no
. /etc/os-release 2>/dev/null; echo "os:${{ID:-unknown}} ${{VERSION_ID:-}}"
[ -z "$missing" ] || exit 0
echo "version:$(sinfo --version 2>/dev/null)"
echo "stamp:$(cat "$root/{venv}/{stamp_file}" 2>/dev/null || true)"
"""

# Make the venv anew and install into it. The stamp is written last: an install that broke off
# is done again at the next `up`.
_INSTALL = """
set -e
root={root}
venv="$root/{venv}"
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
tar -xzf "$root/{tarball}" -C "$src"
rm -rf "$venv"
python3 -m venv --system-site-packages --without-pip "$venv"
isolation=--no-build-isolation
"$venv/bin/python" -c 'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 68)' \\
  2>/dev/null || isolation=
# The cluster's torch is kept, never replaced by a multi-GB download into the shared root.
"$venv/bin/python" -c 'import torch; print("torch==" + torch.__version__.split("+")[0])' \\
  > "$src/keep-torch.txt" 2>/dev/null || : > "$src/keep-torch.txt"
"$venv/bin/python" -m pip install --disable-pip-version-check --no-input $isolation \\
  -c "$src/keep-torch.txt" "$src" "$src/workspace"
"$venv/bin/lenslab-box" --version
"$venv/bin/lenslab-train" --help > /dev/null
rm -f "$root/{tarball}"
printf '%s\\n' {stamp} > "$venv/{stamp_file}"
"""

INSTALL_FIX = "the login node needs python3 with venv, and the cluster's Python a torch that lenslab-workspace accepts"


def venv_path(root: str) -> str:
    """The venv every compute node runs lenslab from: ``<venv>/bin/lenslab-train``."""
    return f"{root.rstrip('/')}/{VENV}"


def check(runner: Runner, root: str) -> dict[str, str]:
    """The login node's answers (missing commands, resolved root, ...); one line when unusable."""
    expanded = f"~{shlex.quote(root[1:])}" if root.startswith("~") else shlex.quote(root)
    script = _CHECK.format(root=expanded, commands=" ".join(COMMANDS), venv=VENV, stamp_file=STAMP_FILE)
    result = runner.run("bash -s", stdin=script.encode())
    answers = dict(line.split(":", 1) for line in result.stdout.splitlines() if ":" in line)
    missing = answers.get("missing", " ".join(COMMANDS)).split()
    if missing:
        raise BootstrapError(
            f"the login node has no {', '.join(missing)} on its PATH (the cluster's client commands)",
            "point box.host at the cluster's login node, or load its scheduler's module in ~/.bashrc",
        )
    if not answers.get("root") or answers.get("writable") != "yes" or values_.bad_char(answers["root"]):
        raise BootstrapError(
            f"the persistent root {root} on the login node is not a writable directory",
            "set box.root to a directory of yours on the shared file system the compute nodes see",
        )
    return answers


def make_ready(cfg: Config, box: Box, runner: Runner, progress: Progress) -> dict[str, Any]:
    """Check the login node, then lenslab in the venv on the shared root; `up`'s summary."""
    source_context(cfg)  # no checkout to install from: said before anything is done on the cluster
    with progress.step("the scheduler's commands and the shared root"):
        answers = check(runner, box.root)
    root = answers["root"]
    with progress.step("lenslab in a venv on the shared root") as show:
        installed = install(cfg, runner, root, answers.get("stamp", ""), show)
    os_id, _, os_version = answers.get("os", "unknown").partition(" ")
    name, version = _name_version(answers.get("version", ""))
    changed = [f"installed lenslab into {venv_path(root)}"] if installed["installed"] else []
    return {
        "root": root,
        "os": os_id,
        "os_version": os_version,
        "gpus": [],
        "docker": "none",
        "changed": changed,
        "scheduler": {"name": name, "version": version, "venv": installed},
    }


def source_context(cfg: Config) -> Path:
    """The checkout of lenslab that `up` installs on the shared root (box.build_context)."""
    from lenslab.remote.labsession import build_context

    context = build_context(cfg)
    if context is None or not (context / "workspace" / "pyproject.toml").is_file():
        raise ConfigError(
            f"{cfg.path}: box.build_context: `lenslab up` installs lenslab on the cluster's shared root "
            "from a checkout of lenslab, and there is none here",
            "set box.build_context to the directory with lenslab's Dockerfile (a checkout of lenslab)",
        )
    return context


def install(cfg: Config, runner: Runner, root: str, found: str, show: Callable[[str], None]) -> dict[str, object]:
    """lenslab in ``<root>/.lenslab/venv``, installed only when its stamp differs from ``found``."""
    context = source_context(cfg)
    wanted = stockbox.stamp(context)
    venv = venv_path(root)
    if found == wanted:
        return {"venv": venv, "installed": False, "stamp": wanted}
    show(f"installing lenslab into {venv} (first `up`, or a new lenslab)")
    runner.run("mkdir -p " + " ".join(shlex.quote(f"{root}/{sub}") for sub in LAYOUT), check=True)
    runner.put(stockbox.tarball(context), f"{root}/{stockbox.TARBALL}", 0o600)
    fields = {"root": shlex.quote(root), "venv": VENV, "tarball": stockbox.TARBALL,
              "stamp": shlex.quote(wanted), "stamp_file": STAMP_FILE}  # fmt: skip
    result = runner.run("bash -s", stdin=_INSTALL.format(**fields).encode())
    if result.exit_status != 0:
        tail = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()][-3:]
        raise BootstrapError(
            f"installing lenslab into {venv} failed (exit {result.exit_status}): {' | '.join(tail)}", INSTALL_FIX
        )
    return {"venv": venv, "installed": True, "stamp": wanted}


# `status`: the root's disk, uptime and the cluster as sinfo sees it, in one round trip.
_FACTS = """
root={root}
[ -d "$root" ] && echo root_exists:yes || echo root_exists:no
echo "root_used_kb:$(du -sk "$root" 2>/dev/null | cut -f1)"
df -Pk "$root" 2>/dev/null | awk 'NR==2 {{print "disk_total_kb:" $2; print "disk_free_kb:" $4}}'
echo "uptime_s:$(cut -d. -f1 /proc/uptime 2>/dev/null)"
echo "version:$(sinfo --version 2>/dev/null)"
sinfo -h -o 'partition:%P %a %D %T' 2>/dev/null
sinfo -h -N -o 'node:%N %P %T %c' 2>/dev/null
"""


def facts(runner: Runner, root: str) -> dict[str, Any]:
    """`lenslab status`'s facts for a login node: status.sh's fields plus ``scheduler``."""
    result = runner.run("bash -s", stdin=_FACTS.format(root=shlex.quote(root)).encode())
    return parse_facts(result.stdout, root)


def parse_facts(stdout: str, root: str) -> dict[str, Any]:
    """What the facts script printed, as `status` shows it; lines that are not facts are ignored."""
    values: dict[str, str] = {}
    partitions: list[dict[str, Any]] = []
    nodes: list[dict[str, Any]] = []
    for line in stdout.splitlines()[:MAX_FACT_LINES]:
        if values_.bad_char(line) is not None or len(line) > 300:
            continue  # printed on the laptop's terminal: nothing that could hide or break a line
        key, _, value = line.partition(":")
        words = value.split()
        if key == "partition" and len(words) == 4:
            partitions.append({"name": words[0].rstrip("*"), "default": words[0].endswith("*"),
                               "available": words[1], "nodes": _int(words[2]), "state": words[3]})  # fmt: skip
        elif key == "node" and len(words) == 4:
            nodes.append({"name": words[0], "partition": words[1].rstrip("*"), "state": words[2],
                          "cpus": _int(words[3])})  # fmt: skip
        elif key:
            values[key] = value.strip()
    name, version = _name_version(values.get("version", ""))
    return {
        "root": root,
        "root_exists": values.get("root_exists") == "yes",
        "root_used_kb": _int(values.get("root_used_kb")),
        "disk_free_kb": _int(values.get("disk_free_kb")),
        "disk_total_kb": _int(values.get("disk_total_kb")),
        "uptime_s": _int(values.get("uptime_s")),
        "gpus": [],
        "containers": None,
        "scheduler": {
            "name": name,
            "version": version,
            "partitions": partitions,
            "nodes": nodes,
        },
    }


def _name_version(text: str) -> tuple[str, str]:
    """`sinfo --version`'s "slurm 22.05.8" (Debian's: "slurm-wlm 22.05.8") as ("Slurm", "22.05.8")."""
    name, _, version = text.strip().partition(" ")
    return name.split("-")[0].capitalize() or "?", version.strip() or "?"


def _int(text: str | None) -> int | None:
    return int(text) if text and text.isdigit() else None


def stop_all() -> list[str]:
    """`lenslab down` on a cluster cancels nothing: the jobs are the cluster's to run (and a
    shared queue is no box to stand down); `lenslab stop NAME` stops a run."""
    return []
