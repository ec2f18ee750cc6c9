#!/usr/bin/env bash
# `make image`: letngpt's CPU image from nothing but Debian's packages and PyPI, no image
# registry. Stages (one progress line each, with its time):
#   base      a Debian bookworm root filesystem from debootstrap, imported as $BASE_TAG
#             (cached: rebuilt only when that image is missing)
#   wheels    the CPU build of torch, pinned in constraints/cpu.txt, downloaded on the host
#             into docker/wheelhouse/ (in a container PyPI's torch is the multi-GB CUDA build)
#   assets    the tokenizer files and Tiny Shakespeare, copied from this machine when it has
#             them (into docker/assets/), otherwise the build downloads them
#   image     docker/Dockerfile on the base, FLAVOUR=cpu, tagged $IMAGE_TAG
#   postgres  (`build.sh postgres`) docker/postgres.Dockerfile on the same base
# Build containers use the host's network (there is no bridge network). Logs: $LOG_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."

DOCKER=${DOCKER:-/usr/bin/docker}   # Debian's client: BuildKit built in, no `# syntax` fetch
[[ -x $DOCKER ]] || DOCKER=$(command -v docker)
BASE_TAG=${BASE_TAG:-letngpt-base:bookworm}
IMAGE_TAG=${IMAGE_TAG:-letngpt:cpu}
POSTGRES_TAG=${POSTGRES_TAG:-letngpt-postgres:15}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
PYTHON=${PYTHON:-python3}
LOG_DIR=${LOG_DIR:-docker/.logs}
SHARED=../shared/data
export DOCKER_BUILDKIT=1
mkdir -p "$LOG_DIR"

# stage NAME COMMAND...: run COMMAND with its output in $LOG_DIR/NAME.log, then one line.
stage() {
    local name=$1 start=$SECONDS
    shift
    if ! "$@" >"$LOG_DIR/$name.log" 2>&1; then
        tail -n 30 "$LOG_DIR/$name.log" >&2
        echo "image: $name FAILED after $((SECONDS - start)) s (log: $LOG_DIR/$name.log)" >&2
        exit 1
    fi
    echo "image: $name $(tail -n 1 "$LOG_DIR/$name.log") ($((SECONDS - start)) s)"
}

# The host's CA bundle replaces the base's: containers then trust what the host trusts (a
# TLS-inspecting proxy, say). minbase + python3-venv: the smallest base a virtualenv needs.
base() (  # a subshell: its EXIT trap removes the root filesystem, whatever happens
    if "$DOCKER" image inspect "$BASE_TAG" >/dev/null 2>&1; then
        echo "$BASE_TAG cached"
        return
    fi
    command -v debootstrap >/dev/null || { echo "no debootstrap (apt-get install debootstrap)"; return 1; }
    rootfs=$(mktemp -d)
    trap 'rm -rf "$rootfs"' EXIT
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" "$MIRROR"
    cp "$CA_BUNDLE" "$rootfs/etc/ssl/certs/ca-certificates.crt"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | "$DOCKER" import --change 'ENV LANG=C.UTF-8' - "$BASE_TAG"
    echo "$BASE_TAG built"
)

wheels() {
    local torch
    torch=$(grep -E '^torch==' constraints/cpu.txt | cut -d' ' -f1)
    # The base's Python is bookworm's 3.11, whatever this machine's is.
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
        --platform manylinux_2_28_x86_64 -d docker/wheelhouse "$torch"
    basename "$(find docker/wheelhouse -name "torch-*.whl" | sort | tail -n 1)"
}

assets() {
    local cache=${TIKTOKEN_CACHE_DIR:-$SHARED/tiktoken}
    mkdir -p docker/assets/tiktoken
    if [[ -f $SHARED/tinyshakespeare.txt ]]; then cp "$SHARED/tinyshakespeare.txt" docker/assets/; fi
    if [[ -d $cache ]]; then cp -r "$cache/." docker/assets/tiktoken/; fi
    echo "$(find docker/assets -type f ! -name .gitignore | wc -l) files from this machine"
}

image() {
    "$DOCKER" build --network=host --progress=plain -f docker/Dockerfile --build-arg FLAVOUR=cpu \
        --build-arg BASE_IMAGE="$BASE_TAG" -t "$IMAGE_TAG" .
    echo "$IMAGE_TAG built"
}

postgres() {
    "$DOCKER" build --network=host --progress=plain -f docker/postgres.Dockerfile \
        --build-arg BASE_IMAGE="$BASE_TAG" -t "$POSTGRES_TAG" docker
    echo "$POSTGRES_TAG built"
}

start=$SECONDS
stage base base
case ${1:-image} in
    image) stage wheels wheels; stage assets assets; stage image image ;;
    postgres) stage postgres postgres ;;
    base) ;;
    *) echo "usage: $0 [image|postgres|base]" >&2; exit 2 ;;
esac
echo "image: done in $((SECONDS - start)) s"
