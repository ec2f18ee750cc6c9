#!/usr/bin/env bash
# Starts Debian's dockerd the way the Docker tests need it, unless a daemon already answers:
# no bridge network, no iptables rules (containers use the host's network or none at all).
# Needs root. Idempotent. Prints one line; on failure the reason and dockerd's last log lines.
set -euo pipefail

DOCKER=${DOCKER:-/usr/bin/docker}   # Debian's client: another one may come first on PATH
LOG=${DOCKERD_LOG:-/var/log/letngpt-dockerd.log}

if "$DOCKER" info >/dev/null 2>&1; then
    echo "start_dockerd: dockerd already answers"
    exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
    echo "start_dockerd: not root, cannot start dockerd" >&2
    exit 1
fi
if ! command -v dockerd >/dev/null 2>&1; then
    echo "start_dockerd: no dockerd (apt-get install docker.io)" >&2
    exit 1
fi
# setsid: the daemon outlives this script and the make/pytest process that called it.
setsid dockerd --bridge=none --iptables=false --ip-masq=false >>"$LOG" 2>&1 </dev/null &
for _ in $(seq 120); do
    if "$DOCKER" info >/dev/null 2>&1; then
        echo "start_dockerd: dockerd started (log: $LOG)"
        exit 0
    fi
    sleep 0.5
done
echo "start_dockerd: dockerd did not answer within 60 s; the end of $LOG:" >&2
tail -n 20 "$LOG" >&2
exit 1
