#!/usr/bin/env bash
# Wheels that bench/gpu_check.sh needs on a GPU machine that has PyTorch but no network and no
# DeepSpeed: the benchmark times the trainer's own step, which runs in a DeepSpeed engine.
# Run here, where pip reaches an index; it fills .whl/ (ignored by git) with DeepSpeed (built
# without ops, as `make setup` builds it) and the dependencies such a machine lacks, pinned as in
# constraints/cpu.txt. gpu_check.sh installs them into a temporary folder when DeepSpeed is missing.
#
#   bench/gpu_wheels.sh [PYTHON_VERSION]   # the GPU machine's Python, default 3.12
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYVER="${1:-3.12}"
DEST="$ROOT/.whl"
PY="${PYTHON:-python3}"
pin() { grep -E "^$1==" "$ROOT/constraints/cpu.txt" | sed 's/ *;.*//'; }
mkdir -p "$DEST"
rm -f "$DEST"/*.whl
# Pure-Python dependencies DeepSpeed imports that a PyTorch-only image lacks; pydantic_core is compiled.
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
  -d "$DEST" "$(pin hjson)" "$(pin pydantic)" "$(pin pydantic_core)" "$(pin annotated-types)" \
  "$(pin typing-inspection)"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "$(pin deepspeed)"
ls -la "$DEST"
du -sh "$DEST"
