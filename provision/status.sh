#!/usr/bin/env bash
# Facts about a lenslab box for `lenslab status`, as one line of JSON. Read-only, no sudo, fast:
# the persistent root's usage is measured with a short time limit and reported as null when a
# huge tree would take longer.
#
# Input (environment): LENSLAB_ROOT (a leading ~ means this user's home), LENSLAB_BOX (name).
set -euo pipefail

main() {
  local root=${LENSLAB_ROOT:?LENSLAB_ROOT is required}
  root=${root/#\~/$HOME}
  local box=${LENSLAB_BOX:-}

  local uptime_s gpus="[]" driver=null used_kb=null free_kb=null total_kb=null containers=null
  uptime_s=$(cut -d. -f1 /proc/uptime)
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    local rows=() name mem util
    while IFS=, read -r name mem util; do
      rows+=("{\"name\": $(json_str "${name# }"), \"memory_mib\": ${mem// /}, \"utilization_pct\": ${util// /}}")
    done < <(nvidia-smi --query-gpu=name,memory.total,utilization.gpu --format=csv,noheader,nounits)
    gpus="[$(IFS=,; echo "${rows[*]}")]"
    driver=$(json_str "$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -n 1)")
  fi
  if [ -d "$root" ]; then
    read -r total_kb free_kb < <(df -Pk "$root" | awk 'NR == 2 {print $2, $4}')
    used_kb=$(timeout 0.3 du -sk "$root" 2>/dev/null | cut -f1) || used_kb=null
  fi
  # `docker ps` alone: `docker info` would cost more than the rest of this script.
  local ids
  if [ -n "$box" ] && ids=$(docker ps -q --filter "label=lenslab.box=$box" 2>/dev/null); then
    containers=$(echo -n "$ids" | grep -c . || true)
  fi
  printf '{"root": %s, "root_exists": %s, "root_used_kb": %s, "disk_total_kb": %s, "disk_free_kb": %s, "gpus": %s, "driver": %s, "uptime_s": %s, "containers": %s}\n' \
    "$(json_str "$root")" "$([ -d "$root" ] && echo true || echo false)" "${used_kb:-null}" \
    "$total_kb" "$free_kb" "$gpus" "$driver" "$uptime_s" "$containers"
}

json_str() {
  local s=${1//\\/\\\\}
  s=${s//\"/\\\"}
  printf '"%s"' "$s"
}

main "$@" </dev/null
