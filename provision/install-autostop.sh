#!/usr/bin/env bash
# Install or update lenslab's autostop watcher. Runs as root, with the files staged in $STAGE:
# autostop.py, autostop.json and, only when the box may terminate itself, lambda-api-key.
# Idempotent: unchanged files are left alone and the watcher restarts only when one changed.
# With systemd it is a service that survives reboots; without (a container) it runs detached.
set -euo pipefail
stage=${STAGE:?STAGE must name the directory with the staged files}
changed=false

put() {  # put SRC DEST MODE: install only when the content differs
  if ! cmp -s "$1" "$2" 2>/dev/null; then
    install -m "$3" "$1" "$2"
    changed=true
  fi
}

install -d -m 0755 /usr/local/lib/lenslab /var/lib/lenslab
install -d -m 0700 /etc/lenslab
put "$stage/autostop.py" /usr/local/lib/lenslab/autostop.py 0755
put "$stage/autostop.json" /etc/lenslab/autostop.json 0600
if [ -f "$stage/lambda-api-key" ]; then
  put "$stage/lambda-api-key" /etc/lenslab/lambda-api-key 0600
elif [ -f /etc/lenslab/lambda-api-key ]; then
  rm -f /etc/lenslab/lambda-api-key
  changed=true
fi
rm -rf "$stage"

command_line="python3 /usr/local/lib/lenslab/autostop.py --config /etc/lenslab/autostop.json"
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
  unit=/etc/systemd/system/lenslab-autostop.service
  printf '%s\n' "[Unit]" "Description=lenslab autostop: stop this box when nobody uses it" \
    "After=network-online.target docker.service" "" "[Service]" "ExecStart=/usr/bin/env $command_line" \
    "Restart=always" "RestartSec=30" "" "[Install]" "WantedBy=multi-user.target" > "$unit.new"
  put "$unit.new" "$unit" 0644
  rm -f "$unit.new"
  systemctl daemon-reload
  systemctl enable lenslab-autostop >/dev/null 2>&1
  if [ "$changed" = true ]; then systemctl restart lenslab-autostop; else systemctl start lenslab-autostop; fi
  echo "{\"autostop\": \"systemd\", \"changed\": $changed}"
  exit 0
fi

pidfile=/var/lib/lenslab/autostop.pid
if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
  if [ "$changed" = false ]; then
    echo '{"autostop": "detached", "changed": false}'
    exit 0
  fi
  kill "$(cat "$pidfile")"
fi
# shellcheck disable=SC2086  # the command line is meant to split into words
nohup setsid $command_line >/var/lib/lenslab/autostop.log 2>&1 </dev/null &
echo $! > "$pidfile"
echo "{\"autostop\": \"detached\", \"changed\": $changed}"
