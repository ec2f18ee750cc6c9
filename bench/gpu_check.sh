#!/usr/bin/env bash
# One prepared GPU check, for a single NVIDIA GPU with PyTorch installed and no network.
# Needs torch, numpy and DeepSpeed (the presets time the trainer's own step, in a DeepSpeed engine),
# not MLflow, tiktoken or flash-attn. Where DeepSpeed is missing (a PyTorch-only image with no
# network) it is installed into a temporary folder from .whl/, which bench/gpu_wheels.sh fills.
#
#   bench/gpu_check.sh [OUT_DIR]     # OUT_DIR: $1, else $OUT, else ./gpu_check_out
#
# Stages, each a separate Python process under its own time limit (so a slow or out-of-memory
# stage cannot take the others down), all within GPU_CHECK_BUDGET_S (default 445 s; with the
# kill grace periods the whole script ends under 8 minutes):
#   1. flash-attn vs SDPA: bf16 outputs/gradients agree, and their speed (or "not available");
#   2. eager tokens/s, MFU and peak memory of GPT / nGPT / LETNGPT (3 maps) at 1k context (micro
#      batch 8), bf16, 5 warm-up + 30 timed steps each, with the renormalisation's share of the step;
#   3. the same three torch.compile'd (--compile; the warm-up includes the compilation): compiled
#      vs eager ratios in the summary;
#   4. LETNGPT at 4k (micro batch 2) without and with activation checkpointing: peak memory
#      (torch.cuda.max_memory_allocated) and step time, and their ratios;
# 1. also records which SDPA kernels ran, each eager preset of 2. ends with a NaN-loss step the
# non-finite guard must skip (bf16, ZeRO 1) and each compiled stage of 3. its recompilations;
# then summary.json / summary.txt, and the summary table printed last.
# Every stage writes JSON into OUT_DIR; log.txt has everything printed; stages.jsonl each
# stage's exit code (124 = hit its time limit).
#
# Environment: PYTHON (interpreter; default python, else python3), GPU_CHECK_BUDGET_S,
# GPU_CHECK_MODES (the twin stages of 3. and 4.: "compiled ckpt" by default; "ckpt" or "" run fewer),
# GPU_CHECK_STEPS, GPU_CHECK_WARMUP, GPU_CHECK_PRESETS (a subset, space or comma separated),
# GPU_CHECK_DRY_RUN=1 (tiny models on CPU: a rehearsal of the whole pipeline where no GPU exists).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${1:-${OUT:-./gpu_check_out}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
elif command -v python >/dev/null 2>&1; then PY=python
else PY=python3; fi
if ! "$PY" -c "import deepspeed" >/dev/null 2>&1; then
  if compgen -G "$ROOT/.whl/*.whl" >/dev/null; then
    SITE="${TMPDIR:-/tmp}/letngpt-gpu-check-site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "$ROOT"/.whl/*.whl || { echo "gpu_check: cannot install .whl/ wheels"; exit 2; }
    export PYTHONPATH="$SITE:$PYTHONPATH"
  else
    echo "gpu_check: DeepSpeed is not installed; run bench/gpu_wheels.sh where pip works and bring .whl/"
    exit 2
  fi
fi

BUDGET="${GPU_CHECK_BUDGET_S:-445}"
RESERVE=20          # seconds kept back for the summary
FLASH_CAP=30
PRESET_CAP=40       # an eager or checkpointed preset
COMPILE_CAP=65      # a compiled preset: the compilation of the 24-layer model comes first
EXTRA=()
[[ -n "${GPU_CHECK_STEPS:-}" ]] && EXTRA+=(--steps "$GPU_CHECK_STEPS")
[[ -n "${GPU_CHECK_WARMUP:-}" ]] && EXTRA+=(--warmup "$GPU_CHECK_WARMUP")
if [[ -n "${GPU_CHECK_DRY_RUN:-}" && "${GPU_CHECK_DRY_RUN}" != 0 ]]; then EXTRA+=(--dry-run); fi
LOG="$OUT_DIR/log.txt"
STAGES="$OUT_DIR/stages.jsonl"
: > "$LOG"
: > "$STAGES"
START=$SECONDS
HAVE_TIMEOUT=1
command -v timeout >/dev/null 2>&1 || HAVE_TIMEOUT=0

# stage NAME CAP_SECONDS ARGS...: run `python -m bench.gpu_check ARGS` for at most
# min(CAP, what is left of the budget); record its exit code.
stage() {
  local name=$1 cap=$2
  shift 2
  local left=$((BUDGET - RESERVE - (SECONDS - START)))
  ((left < cap)) && cap=$left
  if ((cap < 15)); then
    echo "$name: skipped, the time budget is spent" | tee -a "$LOG"
    printf '{"stage": "%s", "rc": null, "skipped": true}\n' "$name" >> "$STAGES"
    return
  fi
  local t0=$SECONDS rc
  # The Python side stops timing 5 s before its soft budget; `timeout` is the hard limit.
  if ((HAVE_TIMEOUT)); then
    timeout -k 5 "$cap" "$PY" -m bench.gpu_check "$@" --out "$OUT_DIR" --budget "$((cap - 8))" \
      ${EXTRA[@]+"${EXTRA[@]}"} >> "$LOG" 2>&1
    rc=$?
  else
    "$PY" -m bench.gpu_check "$@" --out "$OUT_DIR" --budget "$((cap - 8))" ${EXTRA[@]+"${EXTRA[@]}"} >> "$LOG" 2>&1
    rc=$?
  fi
  printf '{"stage": "%s", "rc": %d, "seconds": %d, "cap_s": %d}\n' "$name" "$rc" "$((SECONDS - t0))" "$cap" \
    >> "$STAGES"
  echo "$name: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG"
}

echo "gpu_check: output in $OUT_DIR, budget ${BUDGET} s, python $PY" | tee -a "$LOG"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true; } \
  | tee -a "$LOG"

stage flash "$FLASH_CAP" flash
PRESETS="${GPU_CHECK_PRESETS:-GPT_1kctx_10k_lr30e-4 nGPT_1kctx_10k_lr30e-4 LETNGPT_1kctx_10k_lr30e-4 LETNGPT_4kctx_10k_lr30e-4}"
for preset in ${PRESETS//,/ }; do   # eager; the renormalisation's share
  stage "preset:$preset" "$PRESET_CAP" preset "$preset"
done
MODES=" ${GPU_CHECK_MODES-compiled ckpt} "
# Each compiled stage gets its own inductor cache: a stage killed at its time limit while inductor writes
# a kernel must not leave a truncated file for the next stage to load.
INDUCTOR_DIR="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_inductor.XXXXXX")"
for preset in ${PRESETS//,/ }; do   # the 1k presets compiled, the 4k one checkpointed
  if [[ $preset == *_1kctx_* && $MODES == *" compiled "* ]]; then
    TORCHINDUCTOR_CACHE_DIR="$INDUCTOR_DIR/$preset" \
      stage "preset:$preset+compiled" "$COMPILE_CAP" preset "$preset" --mode compiled
  elif [[ $preset == *_4kctx_* && $MODES == *" ckpt "* ]]; then
    stage "preset:$preset+ckpt" "$PRESET_CAP" preset "$preset" --mode ckpt
  fi
done
rm -rf "$INDUCTOR_DIR"

echo "gpu_check: stages done after $((SECONDS - START)) s" | tee -a "$LOG"
if ((HAVE_TIMEOUT)); then
  timeout -k 5 "$RESERVE" "$PY" -m bench.gpu_check summary --out "$OUT_DIR" 2>&1 | tee -a "$LOG"
else
  "$PY" -m bench.gpu_check summary --out "$OUT_DIR" 2>&1 | tee -a "$LOG"
fi
echo "gpu_check: total $((SECONDS - START)) s; JSON in $OUT_DIR"
