#!/usr/bin/env bash
# preStop hook of cluster/kubeflow-pytorchjob.yaml:  stop-ranks.sh [LAUNCHER_PID (default 1)]
# Sends SIGTERM straight to the training ranks, the children of torchrun (the container's main
# process, PID 1), and waits until every one has written its checkpoint and exited. Kubernetes
# runs this before it signals PID 1, so the ranks' grace period is terminationGracePeriodSeconds
# whatever the torch version: a torchrun that does not read TORCH_ELASTIC_SHUTDOWN_TIMEOUT would
# otherwise kill them 30 s after forwarding SIGTERM. Reads /proc only (no procps in the image).
set -u
launcher="${1:-1}"

ranks() {
    local stat line fields
    for stat in /proc/[0-9]*/stat; do
        { read -r line < "$stat"; } 2>/dev/null || continue
        read -r -a fields <<< "${line##*) }"   # after "pid (comm) ": state ppid ...
        [[ "${fields[1]:-}" == "$launcher" ]] && echo "${stat//[!0-9]/}"
    done
}

mapfile -t pids < <(ranks)
[[ ${#pids[@]} -eq 0 ]] && exit 0
echo "stop-ranks: SIGTERM to the ranks of process $launcher: ${pids[*]}"
kill -TERM "${pids[@]}" 2>/dev/null
while [[ -n "$(ranks)" ]]; do
    sleep 1
done
echo "stop-ranks: every rank has exited"
