#!/usr/bin/env bash
# The one SLURM launcher behind slurm/train_1k.sh and slurm/train_4k.sh (which only add
# #SBATCH defaults and a preset). It runs as the batch script of a job:
#
#   sbatch slurm/train_4k.sh [--key=value ...]          # any train.py flag, appended last
#   CONFIG=nGPT_4kctx_10k_lr30e-4 OUT_DIR=/scratch/me/ngpt4k sbatch -N 8 slurm/train_4k.sh
#
# On the batch node it finds the master node, then starts ONE srun task per node; each runs
# torchrun with a c10d rendezvous and --nproc_per_node processes (one per GPU). Requeue chain:
# `#SBATCH --signal=B:USR1@<margin>` signals this shell before the time limit; it forwards
# USR1 to the job step, train.py finishes its step, saves a checkpoint and exits 0, and this
# script requeues the job (`scontrol requeue`), which then resumes from that checkpoint with
# the same step count and MLflow run.
#
# Environment (all optional; README.md "Running on a SLURM cluster" explains each):
#   CONFIG            preset (the wrapper's default); a trailing --config=NAME also works
#   OUT_DIR           output folder on a shared filesystem (default $ROOT/out/$CONFIG); a
#                     trailing --out_dir=... also works. A checkpoint there is resumed.
#   DATA_DIR          passed as --data_dir
#   LETNGPT_NPROC_PER_NODE  processes per node (default: GPUs allocated on the node)
#   MASTER_ADDR, MASTER_PORT   rendezvous host (default: first node's address) and port
#                     (default: a free port on the batch node, i.e. the first node)
#   CONTAINER_IMAGE   run each node's task in this image (pyxis: srun --container-image)
#   CONTAINER_MOUNTS  extra pyxis mounts (src:dst[,src:dst]); $ROOT, OUT_DIR and DATA_DIR are
#                     always mounted at the same path
#   VENV              virtualenv to activate on every node (default $ROOT/.venv if present,
#                     without a container)
#   PYTHON            interpreter on the nodes (default: python of VENV, else python3)
#   LETNGPT_SRUN_ARGS, LETNGPT_TORCHRUN_ARGS   extra srun / torchrun options (word-split)
#   LETNGPT_SHUTDOWN_TIMEOUT  seconds torchrun waits for workers after SIGTERM (default 120)
#   LETNGPT_RESIGNAL_INTERVAL  after USR1, repeat it every N s while the trainers run
#                     (default 60; 0: once). Trainers still starting up miss the first one.
#   LETNGPT_REQUEUE   1 (default): requeue after a clean stop before max_iters; 0: never
#   LETNGPT_MAX_RESTARTS  stop requeueing after this many restarts (default 100)
#   LETNGPT_DRY_RUN   1: print the srun command line and exit (no scontrol/srun needed
#                     when MASTER_ADDR is set)
#   LETNGPT_ROOT      the letngpt checkout (default: found from the submit directory)
#   LETNGPT_SCRIPT    the program torchrun starts, relative to LETNGPT_ROOT (default train.py)
#   NCCL_*, TORCH_NCCL_*, OMP_NUM_THREADS, MLFLOW_TRACKING_URI: passed to the trainers.
set -euo pipefail

log() { echo "[launch $(date +%H:%M:%S)] $*"; }
die() {
    echo "[launch] error: $*" >&2
    exit 2
}

# ---------------------------------------------------------------------------------------
# Stage 2: one task per node (srun runs this script again with __node__), possibly inside
# the container. torchrun gets SIGUSR1 *ignored*: SLURM delivers a step signal to every
# process of the step, so the trainers receive USR1 directly and stop cleanly. Were USR1 left
# to torchrun it would either die of it (the default action), or, told to handle it
# (--signals_to_handle), forward it and SIGKILL any worker still saving after
# --shutdown_timeout (30 s by default), then exit 1 although every worker exited 0.
#
# torchrun options newer than some images' torch (--signals_to_handle: torch 2.9; --shutdown_timeout:
# 2026; the default base image's torch is 2.6) are passed only where this node's torchrun lists
# them in its --help. Without them torchrun still forwards SIGTERM/SIGINT/SIGHUP/SIGQUIT to the
# workers, but SIGKILLs a worker 30 s after a SIGTERM.
# ---------------------------------------------------------------------------------------
LATE_TORCHRUN_OPTIONS=(--signals_to_handle --shutdown_timeout)

# node_args := "$@" less the late options this torchrun lacks (only before the script's name).
keep_supported_torchrun_options() {
    local help arg opt late i dropped=()
    help=$("${PYTHON:-python3}" -m torch.distributed.run --help 2>&1) \
        || die "'${PYTHON:-python3} -m torch.distributed.run --help' failed on $(hostname -s): $(tail -n 1 <<<"$help")"
    node_args=()
    for ((i = 1; i <= $#; i++)); do
        arg=${!i}
        if [[ $arg != -* ]]; then  # the script: it and its arguments go through untouched
            node_args+=("${@:i}")
            break
        fi
        opt=${arg%%=*}
        for late in "${LATE_TORCHRUN_OPTIONS[@]}"; do
            if [[ $opt == "$late" && $help != *"$late"* && $help != *"${late//_/-}"* ]]; then
                dropped+=("$opt")
                continue 2
            fi
        done
        node_args+=("$arg")
    done
    if [[ ${#dropped[@]} -gt 0 && ${SLURM_NODEID:-0} == 0 ]]; then
        echo "[launch] warning: this torchrun lacks ${dropped[*]} (older torch): not passing them;" \
            "it SIGKILLs workers 30 s after a SIGTERM" >&2
    fi
}

if [[ ${1:-} == __node__ ]]; then  # (stage 1 is below)
    shift
    if [[ -n ${VENV:-} ]]; then
        # shellcheck disable=SC1091
        source "$VENV/bin/activate"
    fi
    is_host=0
    [[ ${SLURM_NODEID:-0} == 0 ]] && is_host=1
    keep_supported_torchrun_options "$@"
    trap '' USR1  # inherited (SIG_IGN) by torchrun; train.py installs its own handler
    exec "${PYTHON:-python3}" -m torch.distributed.run --rdzv_conf="is_host=$is_host" "${node_args[@]}"
fi

# ---------------------------------------------------------------------------------------
# Stage 1: the batch script.
# ---------------------------------------------------------------------------------------
# First of all: USR1 (sent by SLURM to this shell, --signal=B:USR1@margin) would otherwise
# kill it. Once srun runs, the signal is forwarded to the job step, i.e. to every process of
# it: torchrun ignores it (stage 2), the trainers checkpoint and exit 0.
got_signal=0
srun_pid=""
launched=$SECONDS
forwarded_at=0
forward_usr1() {
    forwarded_at=$SECONDS
    [[ -n $srun_pid ]] && kill -USR1 "$srun_pid" 2>/dev/null || true  # srun forwards it to the step
}
# shellcheck disable=SC2329  # invoked by the trap
on_usr1() {
    got_signal=1
    log "USR1 $((SECONDS - launched)) s after the start: asking the trainers to checkpoint and stop"
    if [[ $((SECONDS - launched)) -lt 120 ]]; then
        log "warning: that early, is --time shorter than the --signal margin?"
    fi
    forward_usr1
}
trap on_usr1 USR1

if [[ -n ${LETNGPT_ROOT:-} ]]; then
    ROOT=$LETNGPT_ROOT
elif [[ -f ${SLURM_SUBMIT_DIR:-}/slurm/launch.sh ]]; then
    ROOT=$SLURM_SUBMIT_DIR
elif [[ -f ${SLURM_SUBMIT_DIR:-}/launch.sh && -f ${SLURM_SUBMIT_DIR:-}/../train.py ]]; then
    ROOT=$(cd "$SLURM_SUBMIT_DIR/.." && pwd)
else
    ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
fi
ROOT=$(cd "$ROOT" && pwd)
[[ -f $ROOT/train.py ]] || die "no train.py in $ROOT: submit from the letngpt checkout or set LETNGPT_ROOT"
cd "$ROOT"
SCRIPT=${LETNGPT_SCRIPT:-train.py}
[[ -f $SCRIPT ]] || die "LETNGPT_SCRIPT=$SCRIPT not found in $ROOT"

DRY_RUN=${LETNGPT_DRY_RUN:-0}
if [[ -z ${SLURM_JOB_ID:-} && $DRY_RUN != 1 ]]; then
    die "not inside a SLURM job: submit with 'sbatch slurm/train_4k.sh' (or set LETNGPT_DRY_RUN=1)"
fi
JOB_ID=${SLURM_JOB_ID:-0}
RESTARTS=${SLURM_RESTART_COUNT:-0}
NNODES=${SLURM_NNODES:-1}

# The trailing arguments go to train.py last, so they override everything we pass. We only
# look for the two we must know: where the run lives, and the preset.
CONFIG=${CONFIG:-tiny_LETNGPT}
user_out=""
prev=""
for arg in "$@"; do
    case $arg in
        --out_dir=* | --out-dir=*) user_out=${arg#*=} ;;
        --config=*) CONFIG=${arg#*=} ;;
    esac
    case $prev in
        --out_dir | --out-dir) user_out=$arg ;;
        --config) CONFIG=$arg ;;
    esac
    prev=$arg
done
OUT_DIR=${user_out:-${OUT_DIR:-out/$CONFIG}}
[[ $OUT_DIR == /* ]] || OUT_DIR=$ROOT/$OUT_DIR
if [[ -n ${DATA_DIR:-} && $DATA_DIR != /* ]]; then
    DATA_DIR=$ROOT/$DATA_DIR
fi

# Processes per node: one per allocated GPU unless told otherwise (CPU runs must say).
gpus=${SLURM_GPUS_ON_NODE:-}
if [[ -z $gpus && -n ${SLURM_GPUS_PER_NODE:-} ]]; then
    gpus=${SLURM_GPUS_PER_NODE##*:}  # "h100:8" -> 8
fi
NPROC=${LETNGPT_NPROC_PER_NODE:-$gpus}
if ! [[ $NPROC =~ ^[1-9][0-9]*$ ]]; then
    die "no GPUs allocated on the node (SLURM_GPUS_ON_NODE='${SLURM_GPUS_ON_NODE:-}'): submit with" \
        "--gpus-per-node=N, or set LETNGPT_NPROC_PER_NODE for a CPU run (with --device=cpu)"
fi

# Rendezvous: the first node of the allocation, by the address SLURM reaches it at.
if [[ -z ${MASTER_ADDR:-} ]]; then
    master_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
    MASTER_ADDR=$(scontrol show node "$master_node" -o 2>/dev/null | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
    MASTER_ADDR=${MASTER_ADDR:-$master_node}
fi
# Its port: a free one, chosen here. The batch script runs on the allocation's first node, which
# hosts the rendezvous, so "free here" is what counts; a port derived from the job id alone
# could be another job's on a shared node. Between this check and torchrun's bind the port is
# not reserved, so two jobs starting in the same second draw at random from 12768 ports.
if [[ -z ${MASTER_PORT:-} ]]; then
    MASTER_PORT=$(python3 "$ROOT/slurm/free_port.py") || {
        MASTER_PORT=$((10000 + JOB_ID % 20000))
        log "warning: no free port found (python3 missing?); using $MASTER_PORT (set MASTER_PORT to choose)"
    }
    if [[ -n ${master_node:-} && -n ${SLURMD_NODENAME:-} && $SLURMD_NODENAME != "$master_node" ]]; then
        log "warning: port $MASTER_PORT was found free on $SLURMD_NODENAME, but $master_node hosts the rendezvous"
    fi
fi
[[ $MASTER_PORT =~ ^[0-9]+$ && $MASTER_PORT -ge 1 && $MASTER_PORT -le 65535 ]] \
    || die "MASTER_PORT=$MASTER_PORT is not a port number"
export MASTER_ADDR MASTER_PORT

# Defaults for the trainers; anything already set in the environment wins.
# (Not the pre-2.2 name NCCL_ASYNC_ERROR_HANDLING: current torch warns about it on every rank.)
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
cpus=${SLURM_CPUS_ON_NODE:-$NPROC}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((cpus / NPROC > 0 ? cpus / NPROC : 1))}
export PYTHONUNBUFFERED=1
# NCCL_IB_*, NCCL_SOCKET_IFNAME, NCCL_NET_GDR_LEVEL, ...: the cluster's business; set them
# in the environment you submit from (sbatch exports it to the job).

if [[ -n ${CONTAINER_IMAGE:-} ]]; then
    export PYTHON=${PYTHON:-python}
else
    if [[ -z ${VENV:-} && -z ${PYTHON:-} && -f $ROOT/.venv/bin/activate ]]; then
        VENV=$ROOT/.venv
    fi
    if [[ -n ${VENV:-} ]]; then
        export VENV
        export PYTHON=${PYTHON:-$VENV/bin/python}
    fi
fi

# train.py's arguments: ours first, the caller's after them (the last occurrence wins).
train_args=(--config="$CONFIG" --out_dir="$OUT_DIR" --init_from=auto)
[[ -n ${DATA_DIR:-} ]] && train_args+=(--data_dir="$DATA_DIR")
train_args+=("$@")
marker=$OUT_DIR/checkpoints/latest_complete
if [[ $RESTARTS -gt 0 ]]; then
    if [[ -f $marker ]]; then
        train_args+=(--init_from=resume)  # a requeued job must continue, never start over
    else
        log "restart $RESTARTS but no checkpoint in $OUT_DIR yet: starting from scratch"
    fi
fi

# shellcheck disable=SC2054  # the commas are torchrun's list syntax
torchrun_args=(
    --nnodes="$NNODES" --nproc_per_node="$NPROC"
    --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$JOB_ID"
    --max_restarts=0 --signals_to_handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT
    --shutdown_timeout="${LETNGPT_SHUTDOWN_TIMEOUT:-120}"
)
# shellcheck disable=SC2206  # word splitting of the extra options is intended
torchrun_args+=(${LETNGPT_TORCHRUN_ARGS:-})

srun_args=(--nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 --chdir="$ROOT")
[[ -n ${SLURM_CPUS_ON_NODE:-} ]] && srun_args+=(--cpus-per-task="$SLURM_CPUS_ON_NODE")
if [[ -n ${CONTAINER_IMAGE:-} ]]; then
    mounts=$ROOT:$ROOT
    [[ $OUT_DIR == "$ROOT"/* ]] || mounts+=,$OUT_DIR:$OUT_DIR
    [[ -n ${DATA_DIR:-} && $DATA_DIR != "$ROOT"/* ]] && mounts+=,$DATA_DIR:$DATA_DIR
    [[ -n ${CONTAINER_MOUNTS:-} ]] && mounts+=,$CONTAINER_MOUNTS
    srun_args+=(--container-image="$CONTAINER_IMAGE" --container-mounts="$mounts" --container-workdir="$ROOT")
fi
# shellcheck disable=SC2206
srun_args+=(${LETNGPT_SRUN_ARGS:-})

cmd=(srun "${srun_args[@]}" bash "$ROOT/slurm/launch.sh" __node__ "${torchrun_args[@]}" "$SCRIPT" "${train_args[@]}")

log "job $JOB_ID restart $RESTARTS: $NNODES node(s) x $NPROC process(es), master $MASTER_ADDR:$MASTER_PORT"
log "out_dir $OUT_DIR${CONTAINER_IMAGE:+, image $CONTAINER_IMAGE}"
log "command: ${cmd[*]}"
if [[ $DRY_RUN == 1 ]]; then
    echo "--- command, one argument a line ---"
    printf '%s\n' "${cmd[@]}"
    exit 0
fi

mkdir -p "$OUT_DIR"
stamp=$OUT_DIR/.launch-$JOB_ID
touch "$stamp"  # summary.json newer than this was written by this launch

if [[ $got_signal == 1 ]]; then
    log "USR1 arrived before the launch: not starting the trainers"
    rc=0
else
    "${cmd[@]}" &
    srun_pid=$!
fi
# Poll rather than block in `wait`: a trainer still starting up when USR1 came had it ignored
# (see stage 2), so the request is repeated every LETNGPT_RESIGNAL_INTERVAL s until srun ends.
resignal=${LETNGPT_RESIGNAL_INTERVAL:-60}
while [[ -n $srun_pid ]] && kill -0 "$srun_pid" 2>/dev/null; do
    sleep 1 &
    wait $! || true  # a trap interrupts this wait; the loop goes on
    if [[ $got_signal == 1 && $resignal -gt 0 && $((SECONDS - forwarded_at)) -ge $resignal ]] \
        && kill -0 "$srun_pid" 2>/dev/null; then
        log "trainers still running: repeating USR1"
        forward_usr1
    fi
done
while [[ -n $srun_pid ]]; do
    rc=0
    wait "$srun_pid" || rc=$?
    if [[ $rc -gt 128 ]] && kill -0 "$srun_pid" 2>/dev/null; then
        continue  # interrupted by a trap while srun still runs
    fi
    break
done
[[ -n $srun_pid ]] && log "srun exited with $rc"

stop_reason=""
summary=$OUT_DIR/summary.json
if [[ -f $summary && $summary -nt $stamp ]]; then
    stop_reason=$(sed -n 's/.*"stop_reason": *"\([^"]*\)".*/\1/p' "$summary")
    log "summary: $(tr -d '\n ' < "$summary" | cut -c1-300)"
fi
rm -f "$stamp"

if [[ $stop_reason == max_iters ]]; then
    log "training complete"
    exit "$rc"
fi
continue_reasons=" SIGUSR1 SIGTERM time_limit_seconds max_iters_per_launch "
if [[ $got_signal == 1 || $continue_reasons == *" $stop_reason "* && -n $stop_reason ]]; then
    if [[ ${LETNGPT_REQUEUE:-1} != 1 ]]; then
        log "stopped (${stop_reason:-signal}) before max_iters; LETNGPT_REQUEUE=0, not requeueing"
        exit "$rc"
    fi
    if [[ $RESTARTS -ge ${LETNGPT_MAX_RESTARTS:-100} ]]; then
        log "stopped before max_iters, but restart $RESTARTS reached LETNGPT_MAX_RESTARTS; not requeueing"
        exit 1
    fi
    if [[ -f $marker ]]; then
        log "requeueing job $JOB_ID to resume from $(cat "$marker") (stop reason: ${stop_reason:-none})"
    else
        log "requeueing job $JOB_ID; no checkpoint to resume from yet"
    fi
    if ! scontrol requeue "$JOB_ID"; then
        log "scontrol requeue failed (submitted with --no-requeue?): resubmit the same command to resume"
        exit 1
    fi
    # SLURM now ends this run of the script; the job waits (BeginTime) and starts again.
    sleep 300 &
    wait $! || true
    exit 0
fi
log "training did not complete (srun exit $rc, stop reason '${stop_reason:-none}')"
exit $((rc == 0 ? 1 : rc))
