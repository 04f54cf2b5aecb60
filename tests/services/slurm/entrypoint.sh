#!/bin/bash
# Start one node of the test cluster: munged, then the role's daemons. Run under --init (tini is
# PID 1 and reaps what slurmd's job steps leave behind).
#   ctl   slurmctld, and sshd on port 22 for the login user (AUTHORIZED_KEY)
#   node  slurmd
# /cluster (read-only) holds slurm.conf and munge.key; /shared is the cluster's shared FS.
set -euo pipefail
role=${1:?role: ctl or node}

install -m 0644 /cluster/slurm.conf /etc/slurm/slurm.conf
install -o munge -g munge -m 0400 /cluster/munge.key /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge
runuser -u munge -- /usr/sbin/munged
for _ in $(seq 50); do [ -S /run/munge/munge.socket.2 ] && break; sleep 0.1; done

if [ "$role" = ctl ]; then
  install -d -m 0700 -o lab -g lab /home/lab/.ssh
  printf '%s\n' "${AUTHORIZED_KEY:?}" > /home/lab/.ssh/authorized_keys
  chown lab:lab /home/lab/.ssh/authorized_keys
  chmod 0600 /home/lab/.ssh/authorized_keys
  install -d -m 0755 /shared
  install -d -o lab -g lab -m 0755 "${SHARED_ROOT:?}"
  ssh-keygen -A >/dev/null
  mkdir -p /run/sshd
  /usr/sbin/sshd -p 22 -o PasswordAuthentication=no
  exec /usr/sbin/slurmctld -D -i
fi
exec /usr/sbin/slurmd -D -N "$(hostname)"
