#!/usr/bin/env bash
# Build the base image the image tests build lenslab's Dockerfile on: a minimal Debian bookworm
# root filesystem (debootstrap --variant=minbase, like the `debian:bookworm` image: no Python, no
# CA certificates) imported into Docker, because no image registry is reachable from CI.
# Built once and reused while its tag exists. Needs root (or passwordless sudo), debootstrap and
# a running dockerd (start.sh provides both and calls this script).
set -euo pipefail

IMAGE=${LENSLAB_TEST_BASE_IMAGE:-lenslab-test-base:bookworm-1}
STATE_DIR=${LENSLAB_SERVICES_DIR:-/tmp/lenslab-services}
SUITE=bookworm

die() { echo "base-image: error: $*" >&2; exit 1; }
log() { echo "base-image: $*"; }

SUDO=()
[ "$(id -u)" -ne 0 ] && SUDO=(sudo -n)

# shellcheck disable=SC1091  # lib.sh is shellchecked on its own
source "$(dirname "$0")/lib.sh"

if "${SUDO[@]}" docker image inspect "$IMAGE" >/dev/null 2>&1; then
  log "image $IMAGE cached"
  exit 0
fi
mkdir -p "$STATE_DIR"
mirror=$(debian_mirror)
rootfs=$(mktemp -d "${TMPDIR:-/tmp}/lenslab-base-rootfs.XXXXXX")
# shellcheck disable=SC2064  # expand now: the trap must remove this very directory
trap "${SUDO[*]} rm -rf '$rootfs'" EXIT
log "debootstrap $SUITE from $mirror (a few minutes, once)"
"${SUDO[@]}" debootstrap --variant=minbase "$SUITE" "$rootfs" "$mirror" \
  >"$STATE_DIR/debootstrap-base.log" 2>&1 \
  || { tail -n 20 "$STATE_DIR/debootstrap-base.log" >&2; die "debootstrap failed"; }
"${SUDO[@]}" rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin
log "importing $IMAGE"
"${SUDO[@]}" tar -C "$rootfs" -c . | "${SUDO[@]}" docker import \
  --change 'CMD ["/bin/bash"]' - "$IMAGE" >/dev/null || die "docker import failed"
log "image $IMAGE built"
