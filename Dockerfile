# The image every lenslab box runs: the dev container (VSCode, Jupyter) and the training
# containers. Build it from the repository root:
#
#   docker build -t lenslab:latest .
#
# Build arguments:
#   BASE_IMAGE   any Debian or Ubuntu image; the default brings the CUDA runtime for GPU boxes.
#                A plain `debian:bookworm` works too (CPU only).
#   TORCH_SPEC   pip arguments that install torch, e.g. "torch==2.13.0" (PyPI's Linux wheel is
#                the CUDA build) or "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu".
#   USER_UID / USER_GID   match the box user that owns the persistent root (default 1000).
#
# Optional files in devcontainer/extras/ (git-ignored, see the README there):
#   *.crt   PEM certificates to trust, for networks that inspect TLS through a proxy
#           (apt, pip and the Hugging Face client in the image then trust them).
#   *.whl   local wheels preferred over the index (e.g. a torch wheel already downloaded).
#
# It also builds with the legacy builder (no BuildKit), so it uses no RUN --mount.

ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

ARG USERNAME=lab
ARG USER_UID=1000
ARG USER_GID=1000

# LENSLAB_ROOT is where the box's persistent root is mounted; the layout (workspace/ checkpoints/
# hf-cache/ runs/) is the one provision/bootstrap.sh creates on the box.
ENV DEBIAN_FRONTEND=noninteractive \
    LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/lenslab/venv \
    PATH=/opt/lenslab/venv/bin:$PATH \
    LENSLAB_ROOT=/lab \
    HF_HOME=/lab/hf-cache \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt

# The README is the anchor that makes the globs optional (COPY fails only when nothing at all
# matches). Not the Dockerfile or .dockerignore: editing the first, or building through a tool
# that rewrites the second (the devcontainer CLI does), would rebuild every layer below.
COPY devcontainer/extras/README.md devcontainer/extras/*.crt /tmp/lenslab-ca/

# An extra CA has to be trusted before the first apt-get: a base image's apt sources may be
# HTTPS (the CUDA images' are) and the proxy intercepts them too.
RUN set -eux; \
    extra=/tmp/lenslab-ca/all.pem; \
    cat /tmp/lenslab-ca/*.crt > "$extra" 2>/dev/null || true; \
    if [ -s "$extra" ]; then \
      if command -v update-ca-certificates >/dev/null; then \
        install -m 0644 "$extra" /usr/local/share/ca-certificates/lenslab-extra-ca.crt; \
        update-ca-certificates; \
      else \
        echo "Acquire::https::CAInfo \"$extra\";" > /etc/apt/apt.conf.d/99lenslab-extra-ca; \
      fi; \
    fi; \
    apt-get update; \
    apt-get install -y --no-install-recommends ca-certificates python3 python3-venv git curl procps \
      openssh-server; \
    rm -f /etc/ssh/ssh_host_*; \
    if [ -s "$extra" ]; then \
      install -m 0644 "$extra" /usr/local/share/ca-certificates/lenslab-extra-ca.crt; \
      update-ca-certificates; \
      rm -f /etc/apt/apt.conf.d/99lenslab-extra-ca; \
    fi; \
    rm -rf /var/lib/apt/lists/* /tmp/lenslab-ca

# Ubuntu images ship a user `ubuntu` with UID 1000; the lab user takes that UID so files on the
# persistent root keep one owner across the box and its containers.
RUN set -eux; \
    existing=$(getent passwd "$USER_UID" | cut -d: -f1 || true); \
    if [ -n "$existing" ] && [ "$existing" != "$USERNAME" ]; then userdel --remove "$existing"; fi; \
    getent group "$USER_GID" >/dev/null || groupadd --gid "$USER_GID" "$USERNAME"; \
    useradd --uid "$USER_UID" --gid "$USER_GID" --create-home --shell /bin/bash "$USERNAME"; \
    install -d -o "$USER_UID" -g "$USER_GID" /opt/lenslab /lab \
      /lab/workspace /lab/checkpoints /lab/hf-cache /lab/runs; \
    printf '%s\n' 'case ":$PATH:" in *:/opt/lenslab/venv/bin:*) ;; *) PATH=/opt/lenslab/venv/bin:$PATH ;; esac' \
      'export LENSLAB_ROOT="${LENSLAB_ROOT:-/lab}" HF_HOME="${HF_HOME:-/lab/hf-cache}"' \
      > /etc/profile.d/lenslab.sh

# The venv belongs to the lab user, so `pip install` works in the dev container without sudo.
USER ${USERNAME}

# torch first, in its own layer: it is the biggest download and changes least often.
ARG TORCH_SPEC=torch==2.13.0
COPY devcontainer/extras/README.md devcontainer/extras/*.whl /tmp/lenslab-wheels/
RUN set -eux; \
    python3 -m venv /opt/lenslab/venv; \
    pip install --find-links /tmp/lenslab-wheels $TORCH_SPEC; \
    python -c 'import importlib.metadata as m; print("torch==" + m.version("torch"))' \
      > /opt/lenslab/constraints.txt; \
    cat /opt/lenslab/constraints.txt

# Then the dependencies named in both pyproject files, read before any source is copied, so an
# edit to lenslab's code reuses this layer and the torch layer above. The constraint keeps the
# torch just installed (an unpinned resolve could swap in a different multi-GB build). lenslab
# itself, which lenslab-workspace depends on, comes from the source below, never an index.
# s3fs: boxes whose disk does not outlive them mirror runs to S3 (`[box] mirror = "s3://..."`).
COPY pyproject.toml /opt/lenslab/deps/pyproject.toml
COPY workspace/pyproject.toml /opt/lenslab/deps/workspace/pyproject.toml
RUN set -eux; \
    cd /opt/lenslab/deps; \
    python -c 'import sys; from pip._vendor import tomli; \
[print(d) for f in sys.argv[1:] for d in tomli.load(open(f, "rb"))["project"]["dependencies"] if d != "lenslab"]' \
      pyproject.toml workspace/pyproject.toml > /opt/lenslab/requirements.txt; \
    cat /opt/lenslab/requirements.txt; \
    pip install --find-links /tmp/lenslab-wheels -c /opt/lenslab/constraints.txt \
      -r /opt/lenslab/requirements.txt "jupyterlab>=4.2,<5" "setuptools>=68" "s3fs>=2024.2"

# The source last. --no-deps: everything it needs is installed above; no build isolation: the
# setuptools above builds it, so this step needs no network.
COPY --chown=${USER_UID}:${USER_GID} pyproject.toml README.md /opt/lenslab/src/
COPY --chown=${USER_UID}:${USER_GID} src /opt/lenslab/src/src
# src/lenslab/provision links to ../../provision: the scripts lenslab runs on a box.
COPY --chown=${USER_UID}:${USER_GID} provision /opt/lenslab/src/provision
COPY --chown=${USER_UID}:${USER_GID} workspace /opt/lenslab/src/workspace
RUN set -eux; \
    pip install --no-deps --no-build-isolation /opt/lenslab/src /opt/lenslab/src/workspace; \
    rm -rf /opt/lenslab/src/build /opt/lenslab/src/workspace/build; \
    lenslab --help >/dev/null; \
    lenslab-train --help >/dev/null; \
    lenslab-box --version >/dev/null

WORKDIR /lab

# Healthy: the training stack imports, the persistent root is writable, and when the container
# was given an NVIDIA GPU, torch can use it (a host whose container toolkit is not configured
# passes the device files but no working driver).
HEALTHCHECK --interval=60s --timeout=30s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, torch, lenslab_workspace; root = os.environ['LENSLAB_ROOT']; assert os.access(root, os.W_OK), root + ' is not writable'; assert not os.path.exists('/dev/nvidiactl') or torch.cuda.is_available(), 'GPU device present but CUDA unusable'"]

# A container box (an instance that is itself a container, without a Docker engine) starts
# `lenslab-box serve` instead of the default command: sshd for the user lab on this port, and the
# supervisor of its training runs.
EXPOSE 2222

# Jupyter listens on loopback only: it is reached through VSCode's port forwarding or an SSH
# tunnel, never directly from the network. Training containers override this command.
CMD ["jupyter", "lab", "--no-browser", "--ip=127.0.0.1", "--port=8888", "--ServerApp.root_dir=/lab"]
