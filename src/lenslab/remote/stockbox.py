"""A container box on the provider's stock PyTorch image (``[box] image = "stock"``).

The image is the provider's own (its CUDA torch in the system Python), so nothing depends on an
image registry lenslab controls. Its start script runs sshd as root on port 22 with the key
handed in as ``PUBLIC_KEY``. lenslab's part is installed from the laptop at `lenslab up`:

- the sources of lenslab and lenslab-workspace (the build context, as for an SSH box's image)
  go up as one tarball, and a venv ON THE PERSISTENT VOLUME (``<root>/.lenslab/venv``, made with
  ``--system-site-packages`` so it uses the image's torch) gets them with pip. The venv holds a
  stamp (lenslab's version and a hash of those sources): a later instance on the same volume
  whose stamp matches reuses it as it is; a changed lenslab reinstalls it.
- ``lenslab-box`` (and ``lenslab-train``) are linked into /usr/local/bin, which is on the PATH
  of every SSH command, so the lab commands run as on lenslab's own image. The link is in the
  container, not on the volume: every new instance gets it again at `up`.
- ``lenslab-box serve --no-sshd`` is started detached (once per container: its pid file is in
  /tmp): it resumes the runs that were meant to run and keeps the idle and budget watcher.

sshd and its host key stay the image's: lenslab-box's own sshd (as ``lab``, host key on the
volume) exists only once lenslab is installed, and installing it needs a login first. So the
image's root sshd is used, its host key pinned on first use like any new box's; the image makes a
new host key in every new container, and `lenslab down` forgets the old instance's key, so a new
instance is pinned afresh instead of failing as a changed key.
"""

from __future__ import annotations

import hashlib
import io
import os
import shlex
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from lenslab.errors import BootstrapError, ConfigError

if TYPE_CHECKING:
    from lenslab.config import Config
    from lenslab.remote.bootstrap import Runner

VENV = ".lenslab/venv"
STAMP_FILE = "lenslab-stamp"
TARBALL = ".lenslab/lenslab-src.tar.gz"
SERVE_PID_FILE = "/tmp/lenslab-box-serve.pid"  # the container's own: a new instance has none
SERVE_LOG = ".lenslab/serve.log"
LINKED = ("lenslab-box", "lenslab-train")
# What the two distributions are built from, relative to the build context: only these go to a
# rented box, never the rest of a checkout (runs, data, notebooks, an .env).
SOURCES = ("pyproject.toml", "README.md", "src", "provision", "workspace/pyproject.toml", "workspace/lenslab_workspace")
SKIPPED = {"__pycache__", "build", ".pytest_cache", ".mypy_cache"}
SERVE_STOP_SECONDS = 100  # serve stops its runs gracefully (they checkpoint) before it exits
INSTALL_FIX = (
    "the box needs python3 with venv and pip, and a torch that lenslab-workspace accepts "
    "(the provider's PyTorch 2.8 images have both)"
)

# One round trip on a ready box: the stamp; when it matches, the links and serve at once.
_READY = """
venv={venv}
stamp=$(cat "$venv/{stamp_file}" 2>/dev/null || true)
printf '%s\\n' "$stamp"
[ "$stamp" = {stamp} ] || exit 0
{link_and_serve}
"""
_LINK_AND_SERVE = """
for name in {linked}; do ln -sfn "$venv/bin/$name" "/usr/local/bin/$name"; done
pid=$(cat {pid_file} 2>/dev/null || true)
if [ -z "$pid" ] || ! tr '\\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q 'lenslab-box.* serve'; then
  setsid nohup "$venv/bin/lenslab-box" --root {root} serve --no-sshd >> {log} 2>&1 < /dev/null &
  pid=$!
  echo "$pid" > {pid_file}
  sleep 1  # a serve that cannot start (a broken install) exits at once: not "serving"
fi
kill -0 "$pid" 2>/dev/null && echo serving
"""
# Stop a serve of an older venv, then make the venv anew and install into it. The stamp is
# written last: an install that broke off is done again at the next `up`.
_INSTALL = """
set -e
venv={venv}
pid=$(cat {pid_file} 2>/dev/null || true)
# Only a serve of ours: the pid file outlives a restart of the container, and its number may now
# be another process's.
if [ -n "$pid" ] && tr '\\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q 'lenslab-box.* serve' \\
  && kill -TERM "$pid" 2>/dev/null; then
  for _ in $(seq {stop_seconds}); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
fi
src=$(mktemp -d)
tar -xzf {tarball} -C "$src"
rm -rf "$venv"
python3 -m venv --system-site-packages --without-pip "$venv"
# The image's pip and setuptools (system site packages) build the sources without a download
# when setuptools is new enough; else pip fetches a build backend of its own.
isolation=--no-build-isolation
"$venv/bin/python" -c 'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 68)' \\
  2>/dev/null || isolation=
# The image's torch is kept, never replaced: a multi-GB CUDA download into the volume would be
# the wrong torch for the image's CUDA. A lenslab that needs a newer torch fails here instead.
constraints="$src/keep-torch.txt"
"$venv/bin/python" -c 'import torch; print("torch==" + torch.__version__.split("+")[0])' \\
  > "$constraints" 2>/dev/null || : > "$constraints"
"$venv/bin/python" -m pip install --disable-pip-version-check --no-input $isolation -c "$constraints" \\
  "$src" "$src/workspace"
"$venv/bin/lenslab-box" --version
rm -rf "$src" {tarball}
printf '%s\\n' {stamp} > "$venv/{stamp_file}"
"""


def sources(context: Path) -> Iterator[Path]:
    """The files lenslab and lenslab-workspace are built from, in a fixed order."""
    for top in SOURCES:
        path = context / top
        if path.is_file() or path.is_symlink():
            yield path
        elif path.is_dir():
            for base, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if d not in SKIPPED and not d.endswith(".egg-info"))
                # A link to a directory (src/lenslab/provision) goes as the link, not walked.
                links = [d for d in dirs if (Path(base) / d).is_symlink()]
                dirs[:] = [d for d in dirs if d not in links]
                for name in sorted([*names, *links]):
                    if not name.endswith((".pyc", ".pyo")):
                        yield Path(base) / name


def stamp(context: Path) -> str:
    """lenslab's version and a hash of the sources: what the venv on the volume was made from."""
    from lenslab import __version__

    digest = hashlib.sha256()
    for path in sources(context):
        rel = path.relative_to(context).as_posix()
        if path.is_symlink():
            digest.update(f"L {rel} {os.readlink(path)}\0".encode())
        else:
            digest.update(f"F {rel} {path.stat().st_mode & 0o111}\0".encode())
            digest.update(path.read_bytes())
    return f"lenslab-{__version__}-{digest.hexdigest()[:16]}"


def tarball(context: Path) -> bytes:
    """The sources as a gzipped tar (symlinks kept: src/lenslab/provision is one)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for path in sources(context):
            tar.add(path, arcname=path.relative_to(context).as_posix(), recursive=False)
    return out.getvalue()


def source_context(cfg: Config) -> Path:
    from lenslab.remote.labsession import build_context

    context = build_context(cfg)
    if context is None or not (context / "workspace" / "pyproject.toml").is_file():
        raise ConfigError(
            f'{cfg.path}: box.image = "stock" installs lenslab on the box from its sources, and there are none here',
            "set box.build_context to the directory with lenslab's Dockerfile (a checkout of lenslab)",
        )
    return context


def ensure(cfg: Config, runner: Runner, root: str, show: Callable[[str], None]) -> dict[str, object]:
    """lenslab in the venv on the volume (installed when its stamp differs), lenslab-box on the
    PATH and ``serve`` running; what was done."""
    context = source_context(cfg)
    wanted = stamp(context)
    fields = _fields(root, wanted)
    ready = runner.run(_READY.format(**fields, link_and_serve=_LINK_AND_SERVE.format(**fields)))
    lines = ready.stdout.splitlines()
    if ready.exit_status == 0 and lines[:1] == [wanted] and "serving" in lines:
        return {"venv": fields["venv_path"], "installed": False, "stamp": wanted}
    show(f"installing lenslab into {fields['venv_path']} on the volume (first start or a new lenslab)")
    runner.run(f"mkdir -p {shlex.quote(root.rstrip('/') + '/.lenslab')}", check=True)
    runner.put(tarball(context), f"{root.rstrip('/')}/{TARBALL}", 0o600)
    result = runner.run("bash -s", stdin=_INSTALL.format(**fields).encode())
    if result.exit_status != 0:
        tail = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()][-3:]
        raise BootstrapError(
            f"installing lenslab into {fields['venv_path']} failed (exit {result.exit_status}): {' | '.join(tail)}",
            INSTALL_FIX,
        )
    linked = runner.run(f"venv={fields['venv']}\n" + _LINK_AND_SERVE.format(**fields))
    if linked.exit_status != 0 or "serving" not in linked.stdout:
        raise BootstrapError(f"could not start lenslab-box serve on the box: {linked.stderr.strip()[-200:]}")
    return {"venv": fields["venv_path"], "installed": True, "stamp": wanted}


def _fields(root: str, wanted: str) -> dict[str, str]:
    base = root.rstrip("/") or "/"
    venv = f"{base}/{VENV}"
    return {
        "venv": shlex.quote(venv),
        "venv_path": venv,
        "stamp": shlex.quote(wanted),
        "stamp_file": STAMP_FILE,
        "linked": " ".join(LINKED),
        "pid_file": SERVE_PID_FILE,
        "root": shlex.quote(base),
        "log": shlex.quote(f"{base}/{SERVE_LOG}"),
        "tarball": shlex.quote(f"{base}/{TARBALL}"),
        "stop_seconds": str(SERVE_STOP_SECONDS),
    }
