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
    # nvidia-smi's output goes into JSON: numbers only as numbers ("[N/A]" and anything odd is
    # null), text only from a safe set of characters.
    while IFS=, read -r name mem util; do
      rows+=("{\"name\": $(safe_str "$name"), \"memory_mib\": $(num "$mem"), \"utilization_pct\": $(num "$util")}")
    done < <(nvidia-smi --query-gpu=name,memory.total,utilization.gpu --format=csv,noheader,nounits | head -n 64)
    if [ "${#rows[@]}" -gt 0 ]; then
      gpus="[$(IFS=,; echo "${rows[*]}")]"
    fi
    driver=$(safe_str "$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -n 1)")
  fi
  if [ -d "$root" ]; then
    read -r total_kb free_kb < <(df -Pk "$root" | awk 'NR == 2 {print $2, $4}')
    used_kb=$(timeout 0.3 du -sk "$root" 2>/dev/null | cut -f1) || used_kb=null
  fi
  uptime_s=$(num "$uptime_s") total_kb=$(num "$total_kb") free_kb=$(num "$free_kb") used_kb=$(num "$used_kb")
  # `docker ps` alone: `docker info` would cost more than the rest of this script.
  local ids
  if [ -n "$box" ] && ids=$(docker ps -q --filter "label=lenslab.box=$box" 2>/dev/null); then
    containers=$(echo -n "$ids" | grep -c . || true)
  fi
  printf '{"root": %s, "root_exists": %s, "root_used_kb": %s, "disk_total_kb": %s, "disk_free_kb": %s, "gpus": %s, "driver": %s, "uptime_s": %s, "containers": %s}\n' \
    "$(json_str "$root")" "$([ -d "$root" ] && echo true || echo false)" "$used_kb" \
    "$total_kb" "$free_kb" "$gpus" "$driver" "$uptime_s" "$(num "$containers")"
}

# A whole non-negative number as JSON (leading zeros dropped), or null: spaces around it are
# allowed, anything else in it makes it no number.
num() {
  local s=${1//[[:space:]]/}
  if [[ $s =~ ^[0-9]{1,15}$ ]]; then
    printf '%s' "$((10#$s))"
  else
    printf 'null'
  fi
}

# Text from a command (a GPU name, a driver version) as a JSON string of safe characters only.
safe_str() {
  local s=${1//[^A-Za-z0-9 ._:()\/+-]/}
  s=${s# }
  printf '"%s"' "${s:0:200}"
}

json_str() {
  local s=${1//\\/\\\\}
  s=${s//\"/\\\"}
  printf '"%s"' "$s"
}

main "$@" </dev/null
