#!/usr/bin/env bash
# preStop hook of cluster/kubeflow-pytorchjob.yaml:  stop-ranks.sh [LAUNCHER_PID (default 1) [DEPTH (1)]]
# (DEPTH 2: the ranks are the launcher's grandchildren, as under DeepSpeed's runner and its
# launch.py: cluster/deepspeed-hostfile.sh's no-ssh mode.)
# Sends SIGTERM straight to the training ranks, the children of torchrun (the container's main
# process, PID 1), and waits until every one has written its checkpoint and exited. Kubernetes
# runs this before it signals PID 1, so the ranks' grace period is terminationGracePeriodSeconds
# whatever the torch version: a torchrun that does not read TORCH_ELASTIC_SHUTDOWN_TIMEOUT would
# otherwise kill them 30 s after forwarding SIGTERM. Reads /proc only (no procps in the image).
set -u
launcher="${1:-1}"
depth="${2:-1}"

children() {  # the processes whose parent is one of "$@"
    local stat line fields
    for stat in /proc/[0-9]*/stat; do
        { read -r line < "$stat"; } 2>/dev/null || continue
        read -r -a fields <<< "${line##*) }"   # after "pid (comm) ": state ppid ...
        [[ " $* " == *" ${fields[1]:-x} "* ]] && echo "${stat//[!0-9]/}"
    done
}

ranks() {
    local level pids=("$launcher")
    for ((level = 0; level < depth && ${#pids[@]} > 0; level++)); do
        mapfile -t pids < <(children "${pids[@]}")
    done
    (( ${#pids[@]} )) && printf '%s\n' "${pids[@]}"
}

mapfile -t pids < <(ranks)
[[ ${#pids[@]} -eq 0 ]] && exit 0
echo "stop-ranks: SIGTERM to the ranks under process $launcher: ${pids[*]}"
kill -TERM "${pids[@]}" 2>/dev/null
while [[ -n "$(ranks)" ]]; do
    sleep 1
done
echo "stop-ranks: every rank has exited"
