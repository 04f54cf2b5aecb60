#!/usr/bin/env bash
# Make this machine a lenslab box: Docker Engine (and the NVIDIA Container Toolkit when there is
# a GPU), plus the persistent root with workspace/ checkpoints/ hf-cache/ runs/.
#
# Idempotent: each step checks first and changes only what is missing, so a second run changes
# nothing and says so ("changed": [] in the summary).
#
# Input (environment):
#   LENSLAB_ROOT          persistent root; a leading ~ means this user's home   (required)
#   LENSLAB_GPU           required | optional | none                             (default optional)
#   LENSLAB_MIN_FREE_GB   refuse to go on with less free disk than this          (default 5)
# Output: progress lines "bootstrap: ..." on stdout, then one line of JSON (the summary) last.
# Failures the user must fix: one line "lenslab-error[<kind>]: <what and how to fix>" on stderr
# and a distinct exit status (10 no-sudo, 11 unsupported-os, 12 gpu-required, 13 disk-full,
# 14 docker-permission).
#
# lenslab pipes this script into `bash -s`, so everything runs inside main() with stdin detached:
# no command can swallow the rest of the script.
set -euo pipefail

main() {
  local root_in=${LENSLAB_ROOT:?LENSLAB_ROOT is required}
  local gpu_policy=${LENSLAB_GPU:-optional}
  local min_free_gb=${LENSLAB_MIN_FREE_GB:-5}
  ROOT=${root_in/#\~/$HOME}
  CHANGED=()
  WARNINGS=()

  detect_os
  detect_gpus "$gpu_policy"
  check_disk "$min_free_gb"
  ensure_docker
  if [ "$GPU_COUNT" -gt 0 ]; then ensure_nvidia_toolkit; fi
  ensure_root
  summary
}

say() { echo "bootstrap: $*"; }

fail() {
  local kind=$1 code=$2
  shift 2
  echo "lenslab-error[$kind]: $*" >&2
  exit "$code"
}

# Run as root: directly when we are root, else through passwordless sudo (never prompts).
as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo -n "$@"; fi
}

can_root() { [ "$(id -u)" -eq 0 ] || sudo -n true 2>/dev/null; }

need_root() {
  can_root && return 0
  fail no-sudo 10 "user $(id -un) needs passwordless sudo to $1; add '$(id -un) ALL=(ALL) NOPASSWD:ALL' to /etc/sudoers.d/ or ask the box's admin"
}

json_str() {
  local s=${1//\\/\\\\}
  s=${s//\"/\\\"}
  printf '"%s"' "$s"
}

detect_os() {
  OS_ID=unknown
  OS_VERSION=unknown
  if [ -r /etc/os-release ]; then
    # shellcheck disable=SC1091  # present on every systemd-era distribution
    OS_ID=$(. /etc/os-release && echo "${ID:-unknown}")
    # shellcheck disable=SC1091
    OS_VERSION=$(. /etc/os-release && echo "${VERSION_ID:-unknown}")
  fi
  say "os: $OS_ID $OS_VERSION"
}

detect_gpus() {
  local policy=$1
  GPU_COUNT=0
  GPU_JSON="[]"
  DRIVER=null
  if [ "$policy" != none ] && command -v nvidia-smi >/dev/null 2>&1 \
     && nvidia-smi -L >/dev/null 2>&1; then
    local names=() name mem
    while IFS=, read -r name mem; do
      names+=("{\"name\": $(json_str "${name# }"), \"memory_mib\": ${mem// /}}")
    done < <(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader,nounits)
    GPU_COUNT=${#names[@]}
    GPU_JSON="[$(IFS=,; echo "${names[*]}")]"
    DRIVER=$(json_str "$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -n 1)")
  fi
  say "gpus: $GPU_COUNT"
  if [ "$GPU_COUNT" -eq 0 ]; then
    case $policy in
      required) fail gpu-required 12 "no NVIDIA GPU found (nvidia-smi missing or sees none) and box.gpu is 'required'; use a GPU box, install the NVIDIA driver, or set gpu = \"optional\" in lenslab.toml" ;;
      optional) WARNINGS+=("no NVIDIA GPU found: running in CPU mode") ;;
    esac
  fi
}

# The nearest existing ancestor of the root: that is the filesystem the root will live on.
existing_parent() {
  local dir=$1
  while [ ! -d "$dir" ]; do dir=$(dirname "$dir"); done
  echo "$dir"
}

check_disk() {
  local min_gb=$1 where free_kb
  where=$(existing_parent "$ROOT")
  free_kb=$(df -Pk "$where" | awk 'NR == 2 {print $4}')
  DISK_FREE_GB=$((free_kb / 1024 / 1024))
  say "disk: ${DISK_FREE_GB} GiB free at $where"
  if [ "$DISK_FREE_GB" -lt "$min_gb" ]; then
    fail disk-full 13 "only ${DISK_FREE_GB} GiB free on $where, lenslab needs ${min_gb} GiB; free some space or set box.root to a bigger disk"
  fi
}

docker_works() { docker info >/dev/null 2>&1; }
docker_works_as_root() { as_root docker info >/dev/null 2>&1; }

ensure_docker() {
  if ! command -v docker >/dev/null 2>&1; then
    case $OS_ID in
      ubuntu|debian) ;;
      *) fail unsupported-os 11 "Docker is missing and lenslab installs it only on Ubuntu or Debian (this is $OS_ID $OS_VERSION); install Docker Engine yourself, then re-run lenslab up" ;;
    esac
    need_root "install Docker"
    say "installing Docker Engine (docker.io)"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null
    CHANGED+=("installed docker.io")
  fi
  DOCKER_ACCESS=user
  if ! docker_works; then
    can_root || fail docker-permission 14 "user $(id -un) cannot use Docker and has no sudo; ask the box's admin to run: sudo usermod -aG docker $(id -un)"
    if ! docker_works_as_root; then
      say "starting the Docker daemon"
      as_root systemctl start docker 2>/dev/null || as_root service docker start >/dev/null 2>&1 || true
      docker_works_as_root || fail docker-permission 14 "the Docker daemon is not running and could not be started; check 'sudo systemctl status docker' on the box"
      CHANGED+=("started docker")
    fi
    if [ "$(id -u)" -ne 0 ]; then
      grant_docker_group
      DOCKER_ACCESS=group
    fi
  fi
  DOCKER_VERSION=$(as_root docker version --format '{{.Server.Version}}' 2>/dev/null || echo unknown)
  say "docker: $DOCKER_VERSION (access: $DOCKER_ACCESS)"
}

# Membership in the group that owns the socket; it takes effect on the next login, and every
# lenslab command opens a fresh SSH session.
grant_docker_group() {
  local user sock gid group
  user=$(id -un)
  sock=/var/run/docker.sock
  gid=$(stat -c %g "$sock" 2>/dev/null || echo 0)
  if [ "$gid" = 0 ]; then
    fail docker-permission 14 "user $user cannot use Docker and $sock belongs to root; ask the box's admin for access (e.g. a docker group owning the socket)"
  fi
  group=$(getent group "$gid" | cut -d: -f1 || true)
  if [ -n "$group" ] && id -nG "$user" | tr ' ' '\n' | grep -qx "$group"; then
    return 0
  fi
  if [ -z "$group" ]; then
    group=docker
    getent group docker >/dev/null && group=docker-host
    as_root groupadd -g "$gid" "$group"
  fi
  as_root usermod -aG "$group" "$user"
  CHANGED+=("added $user to group $group")
}

ensure_nvidia_toolkit() {
  if ! command -v nvidia-ctk >/dev/null 2>&1; then
    case $OS_ID in
      ubuntu|debian) ;;
      *) fail unsupported-os 11 "the NVIDIA Container Toolkit is missing and lenslab installs it only on Ubuntu or Debian; install it yourself (docs.nvidia.com/datacenter/cloud-native)" ;;
    esac
    need_root "install the NVIDIA Container Toolkit"
    say "installing the NVIDIA Container Toolkit"
    local keyring=/usr/share/keyrings/nvidia-container-toolkit-keyring.gpg
    curl -fsSL https://nvidia.github.io/libnvidia-container/gpgkey | as_root gpg --batch --yes --dearmor -o "$keyring"
    curl -fsSL https://nvidia.github.io/libnvidia-container/stable/deb/nvidia-container-toolkit.list \
      | sed "s#deb https://#deb [signed-by=$keyring] https://#g" \
      | as_root tee /etc/apt/sources.list.d/nvidia-container-toolkit.list >/dev/null
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nvidia-container-toolkit >/dev/null
    as_root nvidia-ctk runtime configure --runtime=docker >/dev/null
    as_root systemctl restart docker 2>/dev/null || as_root service docker restart >/dev/null
    CHANGED+=("installed nvidia-container-toolkit")
  fi
  # Checked once per root: the marker is written only after a container has really seen a GPU.
  local marker="$ROOT/.lenslab/gpu-verified"
  if [ ! -f "$marker" ]; then
    local image=${LENSLAB_GPU_CHECK_IMAGE:-ubuntu:22.04}
    say "checking that a container sees the GPU ($image)"
    as_root docker run --rm --gpus all "$image" nvidia-smi -L >/dev/null \
      || fail gpu-required 12 "a container cannot see the GPU although the driver can; check 'nvidia-ctk runtime configure --runtime=docker' and restart Docker"
    mkdir -p "$ROOT/.lenslab" 2>/dev/null || as_root mkdir -p "$ROOT/.lenslab"
    as_root touch "$marker"
    CHANGED+=("verified GPU in a container")
  fi
}

ensure_root() {
  local sub missing=()
  for sub in workspace checkpoints hf-cache runs; do
    [ -d "$ROOT/$sub" ] || missing+=("$ROOT/$sub")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    if ! mkdir -p "${missing[@]}" 2>/dev/null; then
      need_root "create $ROOT"
      as_root mkdir -p "${missing[@]}"
      as_root chown "$(id -u):$(id -g)" "$ROOT" "${missing[@]}"
    fi
    CHANGED+=("created $ROOT/{workspace,checkpoints,hf-cache,runs}")
  fi
  say "persistent root: $ROOT"
}

summary() {
  local changed_json warnings_json item
  changed_json=""
  for item in "${CHANGED[@]}"; do changed_json+="${changed_json:+, }$(json_str "$item")"; done
  warnings_json=""
  for item in "${WARNINGS[@]}"; do
    warnings_json+="${warnings_json:+, }$(json_str "$item")"
    echo "bootstrap: warning: $item" >&2
  done
  printf '{"os": %s, "os_version": %s, "gpus": %s, "driver": %s, "docker": %s, "docker_access": %s, "root": %s, "disk_free_gb": %s, "changed": [%s], "warnings": [%s]}\n' \
    "$(json_str "$OS_ID")" "$(json_str "$OS_VERSION")" "$GPU_JSON" "$DRIVER" \
    "$(json_str "$DOCKER_VERSION")" "$(json_str "$DOCKER_ACCESS")" "$(json_str "$ROOT")" \
    "$DISK_FREE_GB" "$changed_json" "$warnings_json"
}

main "$@" </dev/null
