# shellcheck shell=bash
# Shared by the service scripts (sourced, not run).

# The Debian mirror this machine already uses (deb822 or one-line format), so images are built
# from the same place apt-get install just worked from.
debian_mirror() {
  local url
  url=$(grep -hoE '^(URIs:|deb) +[a-z]+://[^ ]*/debian/?( |$)' \
        /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null \
        | head -n 1 | awk '{print $2}') || true
  echo "${url:-http://deb.debian.org/debian}"
}
