#!/usr/bin/env bash
# Start a throwaway two-node SLURM cluster on loopback: munged, slurmctld and two slurmd
# (fake nodes n1 and n2, two fake GPUs each), everything under DIR.
#
#   tests/cluster/start.sh DIR [CTLD_PORT N1_PORT N2_PORT]
#   export SLURM_CONF=DIR/slurm.conf      # for every client call (sbatch, scontrol, ...)
#   tests/cluster/stop.sh DIR
#
# DIR and every folder above it must be searchable by all (munged checks; /tmp/x is fine).
# Needs root and Debian's slurmctld slurmd slurm-client munge (.ci/install_system.sh).
# Exits 0 once both nodes are idle; on failure prints the daemon logs and exits 1.
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $0 DIR [CTLD_PORT N1_PORT N2_PORT]" >&2
    exit 2
fi
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DIR=$(realpath -m "$1")
base=$((20000 + RANDOM % 20000))
CTLD_PORT=${2:-$base}
N1_PORT=${3:-$((base + 1))}
N2_PORT=${4:-$((base + 2))}
HOST=$(hostname -s)
PATH=$PATH:/usr/sbin:/sbin

die() {
    echo "start.sh: $*" >&2
    for log in "$DIR"/log/*.log; do
        [[ -f $log ]] && { echo "==> $log <==" >&2; tail -n 40 "$log" >&2; }
    done
    exit 1
}

[[ $(id -u) -eq 0 ]] || die "must run as root (slurmd and munged need it)"
for bin in munged mungekey slurmctld slurmd sinfo scontrol; do
    command -v "$bin" >/dev/null || die "$bin not found (run .ci/install_system.sh)"
done

mkdir -p "$DIR"/{munge,munge-run,state,spool/n1,spool/n2,log,run,dev}
chmod 0700 "$DIR/munge"
chmod 0755 "$DIR" "$DIR/munge-run"  # munged wants its socket folder searchable by all
if [[ ! -f $DIR/munge/munge.key ]]; then
    mungekey --create --keyfile="$DIR/munge/munge.key" >/dev/null
    chmod 0600 "$DIR/munge/munge.key"
fi

# Fake GPUs: gres needs a device file per GPU. Without CAP_MKNOD the nodes get no GPUs and
# jobs must say --gpus-per-node=0 (start.sh records the count in DIR/fake_gpus_per_node).
gpus=2
for node in n1 n2; do
    for i in 0 1; do
        dev=$DIR/dev/$node-gpu$i
        if [[ ! -c $dev ]] && ! mknod -m 0666 "$dev" c 1 3 2>/dev/null; then
            gpus=0
        fi
    done
done
[[ $gpus -eq 2 ]] || echo "start.sh: mknod not permitted; the fake nodes have no GPUs" >&2
echo "$gpus" > "$DIR/fake_gpus_per_node"

render() {
    sed -e "s|@DIR@|$DIR|g" -e "s|@HOST@|$HOST|g" -e "s|@CTLD_PORT@|$CTLD_PORT|g" \
        -e "s|@N1_PORT@|$N1_PORT|g" -e "s|@N2_PORT@|$N2_PORT|g" "$1" > "$2"
}
render "$HERE/slurm.conf.in" "$DIR/slurm.conf"
if [[ $gpus -eq 2 ]]; then
    render "$HERE/gres.conf.in" "$DIR/gres.conf"
else
    sed -i -e '/^GresTypes=/d' -e 's/ Gres=gpu:2//' "$DIR/slurm.conf"
fi
export SLURM_CONF=$DIR/slurm.conf
echo "export SLURM_CONF=$SLURM_CONF" > "$DIR/env.sh"

munged --socket="$DIR/munge-run/munge.socket" --key-file="$DIR/munge/munge.key" \
    --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" \
    --seed-file="$DIR/munge/munged.seed" || die "munged did not start"

slurmctld -f "$SLURM_CONF" || die "slurmctld did not start"
for node in n1 n2; do
    slurmd -f "$SLURM_CONF" -N "$node" || die "slurmd -N $node did not start"
done

for _ in $(seq 1 150); do
    states=$(sinfo -h -N -o '%N=%t' 2>/dev/null | sort -u | tr '\n' ' ' || true)
    if [[ $states == "n1=idle n2=idle " ]]; then
        echo "start.sh: cluster up in $DIR (slurmctld port $CTLD_PORT, slurmd ports $N1_PORT $N2_PORT)"
        exit 0
    fi
    sleep 0.2
done
die "nodes not idle after 30 s: ${states:-no answer from slurmctld}"
