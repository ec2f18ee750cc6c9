#!/usr/bin/env bash
# Stop the cluster started by start.sh DIR: `scontrol shutdown` (slurmctld and both slurmd),
# then munged by its pid. Whatever is still alive after 20 s is killed by its pid file.
set -uo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 DIR" >&2
    exit 2
fi
DIR=$(realpath -m "$1")
export SLURM_CONF=$DIR/slurm.conf
PATH=$PATH:/usr/sbin:/sbin

alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_gone() {  # pid files...
    local f
    for _ in $(seq 1 100); do
        local any=0
        for f in "$@"; do alive "$f" && any=1; done
        [[ $any -eq 0 ]] && return 0
        sleep 0.2
    done
    return 1
}

slurm_pids=("$DIR/run/slurmctld.pid" "$DIR/run/slurmd-n1.pid" "$DIR/run/slurmd-n2.pid")
if alive "$DIR/run/slurmctld.pid"; then
    timeout 20 scontrol shutdown >/dev/null 2>&1 || true
fi
if ! wait_gone "${slurm_pids[@]}"; then
    echo "stop.sh: SLURM daemons still alive after scontrol shutdown; sending SIGTERM then SIGKILL" >&2
    for f in "${slurm_pids[@]}"; do alive "$f" && kill -TERM "$(cat "$f")"; done
    wait_gone "${slurm_pids[@]}" || for f in "${slurm_pids[@]}"; do alive "$f" && kill -KILL "$(cat "$f")"; done
fi
if alive "$DIR/run/munged.pid"; then
    kill -TERM "$(cat "$DIR/run/munged.pid")"
    wait_gone "$DIR/run/munged.pid" || kill -KILL "$(cat "$DIR/run/munged.pid")" 2>/dev/null
fi
echo "stop.sh: cluster in $DIR stopped"
exit 0
