#!/usr/bin/env bash
# letngpt's Python dependencies inside docker/Dockerfile, for one of its two flavours.
#   gpu: into the NGC base's Python, under its own pip constraints (PIP_CONSTRAINT pins its torch)
#        plus docker/constraints.txt; --no-build-isolation so that DeepSpeed's and flash-attn's
#        setups import the image's torch instead of downloading another one.
#   cpu: into a virtualenv /opt/venv (the base's Python is externally managed, PEP 668), the way
#        `make setup` builds .venv: the CPU torch from /tmp/wheelhouse, DeepSpeed without build
#        isolation, everything else built the ordinary way, all pinned by constraints/cpu.txt.
# Both add psycopg (3), so that the image can also serve MLflow on PostgreSQL (compose.test.yml).
set -euo pipefail

case ${1:?usage: install.sh gpu|cpu} in
    gpu)
        PIP_CONSTRAINT="${PIP_CONSTRAINT:-} $PWD/docker/constraints.txt" \
            pip install --no-cache-dir --no-build-isolation -e '.[gpu]' 'psycopg[binary]'
        ;;
    cpu)
        python3 -m venv /opt/venv
        pip=(/opt/venv/bin/python -m pip install --no-cache-dir -c constraints/cpu.txt)
        "${pip[@]}" --upgrade pip setuptools wheel
        torch=(/tmp/wheelhouse/torch-*.whl)
        [[ -f ${torch[0]} ]] || { echo "install.sh: no torch wheel in docker/wheelhouse (make image puts it there)" >&2; exit 2; }
        "${pip[@]}" --no-deps "${torch[@]}"
        "${pip[@]}" --no-build-isolation --no-deps deepspeed
        "${pip[@]}" -e . 'psycopg[binary]'
        ;;
    *)
        echo "install.sh: FLAVOUR must be gpu or cpu, not '$1'" >&2
        exit 2
        ;;
esac
python -c "import torch, deepspeed, mlflow; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__)"
