#!/usr/bin/env bash
# Install Debian's SLURM (slurmctld, slurmd, the client commands) and MUNGE, for the tests in
# tests/cluster/test_slurm.py, which start a private one-node cluster on 127.0.0.1 with them.
#
#   bash .ci/install-slurm.sh          # as root on Debian 12 (apt-get); idempotent
#
# Nothing is started or enabled here: the packages' own services are kept from starting (no
# systemd in CI, and the tests run their own daemons with a private config, key and ports).
# Measured on the 2-core CI machine: 9-13 s in all, `apt-get update` included.
set -euo pipefail

versions() { dpkg-query -W -f='${Package} ${Version}\n' slurmctld slurmd munge 2>/dev/null | paste -sd ' ' -; }

if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null; then
    echo "install-slurm: already installed: $(versions)"
    exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
    echo "install-slurm: needs root (apt-get install)" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null; then
    echo "install-slurm: needs apt-get (Debian or Ubuntu)" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
# A policy-rc.d that denies starting services while the packages install, removed afterwards
# unless one was already there.
policy=/usr/sbin/policy-rc.d
own_policy=0
if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"
    chmod 755 "$policy"
    own_policy=1
fi
cleanup() {
    if [[ $own_policy -eq 1 ]]; then
        rm -f "$policy"
    fi
}
trap cleanup EXIT

start=$SECONDS
apt-get update -qq
apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
echo "install-slurm: installed in $((SECONDS - start)) s: $(versions)"
