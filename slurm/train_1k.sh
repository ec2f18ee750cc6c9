#!/usr/bin/env bash
# LET-nGPT at 1k context on a SLURM cluster: `sbatch slurm/train_1k.sh [--key=value ...]`
# from the letngpt checkout. Every #SBATCH line below can be overridden on the sbatch command
# line (sbatch -N 8 --time=12:00:00 ...) or by SBATCH_* variables; the launcher's own knobs
# (CONFIG, OUT_DIR, CONTAINER_IMAGE, ...) are documented in slurm/launch.sh.
#SBATCH --job-name=letngpt-1k
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
export CONFIG=${CONFIG:-LETNGPT_1kctx_10k_lr30e-4}
# SLURM runs a copy of this file, so the launcher is found from the submit directory.
for root in "${LETNGPT_ROOT:-}" "${SLURM_SUBMIT_DIR:-.}" "${SLURM_SUBMIT_DIR:-.}/.." "$(dirname "$0")/.."; do
    if [[ -n $root && -f $root/slurm/launch.sh ]]; then
        exec bash "$root/slurm/launch.sh" "$@"
    fi
done
echo "error: slurm/launch.sh not found: submit from the letngpt checkout or set LETNGPT_ROOT" >&2
exit 2
