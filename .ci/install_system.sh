#!/usr/bin/env bash
# System packages for the tests that start real servers: SLURM (tests/test_slurm.py: a real
# slurmctld, two slurmd and munge on loopback), PostgreSQL (tests/test_mlflow_postgres.py:
# an MLflow server on it) and Docker with debootstrap (tests/test_docker_run.py: `make image`,
# containers, compose); then starts dockerd (.ci/start_dockerd.sh: no bridge, no iptables) if
# none answers. Idempotent: installs nothing when everything is installed.
# Needs root (or passwordless sudo) and apt; anywhere else it says so and exits 0, and those
# tests then skip (or fail, under CI=true).
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge postgresql docker.io debootstrap)
BINARIES=(slurmctld slurmd sbatch scontrol munged mungekey runuser dockerd debootstrap)
# Debian keeps PostgreSQL's server programs in a versioned folder, off PATH.
PG_BINARIES=(initdb pg_ctl postgres)

have_postgres() {
    local bindir b
    for bindir in /usr/lib/postgresql/*/bin; do
        for b in "${PG_BINARIES[@]}"; do
            [[ -x $bindir/$b ]] || continue 2
        done
        return 0
    done
    return 1
}

have_all() {
    local b
    for b in "${BINARIES[@]}"; do
        command -v "$b" >/dev/null 2>&1 || [[ -x /usr/sbin/$b ]] || [[ -x /sbin/$b ]] || return 1
    done
    # Debian's docker client (another one may come first on PATH; the tests call this one)
    [[ -x /usr/bin/docker ]] && have_postgres
}

# A dockerd that cannot start fails only the Docker tests (they try again and say why), not make test.
start_dockerd() {
    "${SUDO[@]}" bash "$(dirname "$0")/start_dockerd.sh" \
        || echo "install_system: dockerd did not start; tests/test_docker_run.py will say why" >&2
}

SUDO=()
if have_all; then
    echo "install_system: SLURM, munge, PostgreSQL, Docker and debootstrap already installed"
    [[ $(id -u) -eq 0 ]] || { sudo -n true 2>/dev/null && SUDO=(sudo -n); } || exit 0
    start_dockerd
    exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO=(sudo -n)
    else
        echo "install_system: not root and no passwordless sudo; SLURM and PostgreSQL tests will be skipped" >&2
        exit 0
    fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_system: no apt-get; SLURM and PostgreSQL tests will be skipped" >&2
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
# The packages' scripts must not start system daemons (the tests start their own, and CI
# containers have no init; postgresql's would start its default cluster): a temporary
# policy-rc.d says "not now" unless one exists.
policy=/usr/sbin/policy-rc.d
own_policy=0
if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$policy" >/dev/null
    "${SUDO[@]}" chmod 0755 "$policy"
    own_policy=1
fi
cleanup() { [[ $own_policy -eq 1 ]] && "${SUDO[@]}" rm -f "$policy"; return 0; }
trap cleanup EXIT
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
have_all || { echo "install_system: installed ${PACKAGES[*]} but binaries are missing" >&2; exit 1; }
echo "install_system: installed ${PACKAGES[*]}"
start_dockerd
