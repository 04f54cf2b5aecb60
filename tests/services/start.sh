#!/usr/bin/env bash
# Start the real services the lenslab tests use, installing them first on a clean machine:
#   - Docker Engine (Debian's docker.io), started in the background when not already running;
#   - the OpenSSH client and shellcheck, used by the tests directly;
#   - the "fresh VM" image: a Debian root filesystem made with debootstrap and imported into
#     Docker, with openssh-server, sudo, python3 and a non-root sudo user, like a cloud image.
#     It is built once and reused while its tag exists.
# Anything that cannot start stops this script with a non-zero status: CI fails, it never skips.
set -euo pipefail

IMAGE=${LENSLAB_TEST_IMAGE:-lenslab-test-vm:bookworm-1}
STATE_DIR=${LENSLAB_SERVICES_DIR:-/tmp/lenslab-services}
SUITE=bookworm
PACKAGES=(openssh-client openssh-server docker.io debootstrap shellcheck ca-certificates chromium)

die() { echo "services: error: $*" >&2; exit 1; }
log() { echo "services: $*"; }

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || die "not root and sudo is missing; run as root"
  SUDO=(sudo -n)
fi

install_packages() {
  local missing=()
  for pkg in "${PACKAGES[@]}"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing ${missing[*]}"
  "${SUDO[@]}" apt-get update -qq || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null || die "apt-get install ${missing[*]} failed"
}

start_dockerd() {
  if "${SUDO[@]}" docker info >/dev/null 2>&1; then
    log "dockerd already running"
    return 0
  fi
  mkdir -p "$STATE_DIR"
  log "starting dockerd (log: $STATE_DIR/dockerd.log)"
  "${SUDO[@]}" nohup dockerd >"$STATE_DIR/dockerd.log" 2>&1 &
  for _ in $(seq 1 60); do
    "${SUDO[@]}" docker info >/dev/null 2>&1 && { log "dockerd ready"; return 0; }
    sleep 0.5
  done
  tail -n 20 "$STATE_DIR/dockerd.log" >&2 || true
  die "dockerd did not become ready within 30 s"
}

# shellcheck disable=SC1091  # lib.sh is shellchecked on its own
source "$(dirname "$0")/lib.sh"

build_image() {
  if "${SUDO[@]}" docker image inspect "$IMAGE" >/dev/null 2>&1; then
    log "image $IMAGE cached"
    return 0
  fi
  local mirror rootfs
  mirror=$(debian_mirror)
  rootfs=$(mktemp -d "${TMPDIR:-/tmp}/lenslab-rootfs.XXXXXX")
  # shellcheck disable=SC2064  # expand now: the trap must remove this very directory
  trap "${SUDO[*]} rm -rf '$rootfs'" EXIT
  log "debootstrap $SUITE from $mirror (a few minutes, once)"
  "${SUDO[@]}" debootstrap --variant=minbase \
    --include=openssh-server,sudo,python3,ca-certificates,curl,procps,iproute2 \
    "$SUITE" "$rootfs" "$mirror" >"$STATE_DIR/debootstrap.log" 2>&1 \
    || { tail -n 20 "$STATE_DIR/debootstrap.log" >&2; die "debootstrap failed"; }

  # Like a cloud image: a non-root user with passwordless sudo, no host keys baked in (each
  # container makes its own at start, as a VM does on first boot), apt caches emptied.
  "${SUDO[@]}" chroot "$rootfs" useradd --create-home --shell /bin/bash debian
  echo 'debian ALL=(ALL) NOPASSWD:ALL' | "${SUDO[@]}" tee "$rootfs/etc/sudoers.d/90-cloud-users" >/dev/null
  "${SUDO[@]}" chmod 0440 "$rootfs/etc/sudoers.d/90-cloud-users"
  "${SUDO[@]}" rm -f "$rootfs"/etc/ssh/ssh_host_*
  "${SUDO[@]}" rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin
  "${SUDO[@]}" install -m 0644 /etc/ssl/certs/ca-certificates.crt "$rootfs/usr/local/share/host-ca.crt"
  "${SUDO[@]}" install -m 0755 /dev/stdin "$rootfs/usr/local/sbin/vm-init" <<'EOF'
#!/bin/bash
# First boot: fresh host keys, the authorized key handed in, then sshd on 127.0.0.1:$SSH_PORT.
set -euo pipefail
ssh-keygen -A >/dev/null
install -d -m 0700 -o debian -g debian /home/debian/.ssh
printf '%s\n' "$AUTHORIZED_KEY" > /home/debian/.ssh/authorized_keys
chown debian:debian /home/debian/.ssh/authorized_keys
chmod 0600 /home/debian/.ssh/authorized_keys
mkdir -p /run/sshd
exec /usr/sbin/sshd -D -e -p "${SSH_PORT:?}" -o ListenAddress=127.0.0.1 -o PasswordAuthentication=no
EOF
  log "importing $IMAGE"
  "${SUDO[@]}" tar -C "$rootfs" -c . | "${SUDO[@]}" docker import \
    --change 'CMD ["/usr/local/sbin/vm-init"]' - "$IMAGE" >/dev/null \
    || die "docker import failed"
  log "image $IMAGE built"
}

install_packages
for tool in docker dockerd ssh ssh-keygen debootstrap shellcheck; do
  command -v "$tool" >/dev/null || die "$tool is not installed"
done
mkdir -p "$STATE_DIR"
start_dockerd
build_image
# The base the image tests build lenslab's Dockerfile on (tests/image/).
bash "$(dirname "$0")/base-image.sh"
log "ready"
