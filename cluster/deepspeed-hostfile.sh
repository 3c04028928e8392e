#!/usr/bin/env bash
# Multi-node training without a scheduler: write a DeepSpeed hostfile and start the deepspeed
# launcher on it.
#
#   # from one node, over passwordless ssh with pdsh (the default DeepSpeed route)
#   cluster/deepspeed-hostfile.sh --hosts "gpu01 gpu02 gpu03 gpu04" -- \
#       --config configs/train/small-owt.yaml --resume auto data.path=/shared/owt run_dir=/shared/runs/small
#
#   # or without ssh: run the same command on every node with its own --node-rank
#   cluster/deepspeed-hostfile.sh --hosts "gpu01 gpu02" --master-addr gpu01 --node-rank 0 -- ...   # on gpu01
#   cluster/deepspeed-hostfile.sh --hosts "gpu01 gpu02" --master-addr gpu01 --node-rank 1 -- ...   # on gpu02
#
# Everything after `--` goes to pipeline/train.py. Options (or the environment variable named):
#   --hosts "h1 h2 ..."   MDLM_HOSTS       node names, space or comma separated, rank 0 first
#   --hostfile PATH       MDLM_HOSTFILE    where the hostfile is written (MDLM_LOG_DIR/hostfile)
#   --gpus-per-node N     GPUS_PER_NODE    slots per host (8)
#   --master-addr HOST    MDLM_MASTER_ADDR rendezvous host (the first host)
#   --master-port PORT    MDLM_MASTER_PORT rendezvous port (29500)
#   --node-rank R         NODE_RANK        no-ssh mode: start only this node's ranks
#   --log-dir DIR         MDLM_LOG_DIR     hostfile, environment file, per-rank logs (logs/deepspeed)
#   --rank-logs                            one log file per rank in MDLM_LOG_DIR/ranks
#   --dry-run                              write the hostfile and env file, print the command, launch nothing
#   MDLM_PYTHON: interpreter whose deepspeed launcher is used (.venv/bin/python, else python3).
#   MDLM_FORWARD_ENV: names of extra variables to pass to the remote ranks in pdsh mode.
#
# pdsh mode needs pdsh on this node, passwordless ssh to every host, and this checkout, the
# Python environment, the shards and the run directory at the same paths on every host (a
# shared filesystem). DeepSpeed forwards only some variables over pdsh (MLFLOW*, PYTHON*,
# NCCL* ...); this script writes the rest that training needs (TORCH_EXTENSIONS_DIR,
# GLOO_SOCKET_IFNAME, OMP_NUM_THREADS, MDLM_FORWARD_ENV ...) to an environment file that
# DeepSpeed reads (DS_ENV_FILE). In no-ssh mode each node's launcher uses its own environment, and
# SIGTERM or SIGINT to it goes to its ranks, which write a checkpoint and exit (a container's stop).
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
die() { echo "deepspeed-hostfile: $*" >&2; exit 2; }

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
hosts=${MDLM_HOSTS:-}
hostfile=${MDLM_HOSTFILE:-}
gpus=${GPUS_PER_NODE:-8}
master_addr=${MDLM_MASTER_ADDR:-}
master_port=${MDLM_MASTER_PORT:-29500}
node_rank=${NODE_RANK:-}
log_dir=${MDLM_LOG_DIR:-$repo/logs/deepspeed}
rank_logs=0
dry_run=0
while [[ $# -gt 0 ]]; do
    case $1 in
        --hosts) hosts=$2; shift 2 ;;
        --hostfile) hostfile=$2; shift 2 ;;
        --gpus-per-node) gpus=$2; shift 2 ;;
        --master-addr) master_addr=$2; shift 2 ;;
        --master-port) master_port=$2; shift 2 ;;
        --node-rank) node_rank=$2; shift 2 ;;
        --log-dir) log_dir=$2; shift 2 ;;
        --rank-logs) rank_logs=1; shift ;;
        --dry-run) dry_run=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        *) die "unknown option '$1' (training arguments go after --)" ;;
    esac
done

read -r -a host_list <<< "${hosts//,/ }"
[[ ${#host_list[@]} -gt 0 ]] || die "no hosts: pass --hosts \"h1 h2 ...\" or set MDLM_HOSTS"
[[ $gpus =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node must be a positive integer, not '$gpus'"
[[ $master_port =~ ^[0-9]+$ ]] || die "--master-port must be a number, not '$master_port'"
if [[ -n $node_rank ]] && ! [[ $node_rank =~ ^[0-9]+$ && $node_rank -lt ${#host_list[@]} ]]; then
    die "--node-rank must be 0..$((${#host_list[@]} - 1)), not '$node_rank'"
fi
master_addr=${master_addr:-${host_list[0]}}
# absolute: the launcher runs from the checkout, not from where this was called
log_dir=$(realpath -m -- "$log_dir")
hostfile=$(realpath -m -- "${hostfile:-$log_dir/hostfile}")

python=${MDLM_PYTHON:-}
if [[ -z $python ]]; then
    if [[ -x $repo/.venv/bin/python ]]; then python=$repo/.venv/bin/python; else python=python3; fi
fi

mkdir -p "$log_dir" "$(dirname "$hostfile")"
# DeepSpeed's hostfile: one "<host> slots=<accelerators>" line per node, in rank order.
tmp=$(mktemp "$hostfile.XXXXXX")  # unique per node: every container's launcher may be PID 1
for h in "${host_list[@]}"; do
    echo "$h slots=$gpus"
done > "$tmp"
mv "$tmp" "$hostfile"

export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}  # a dead peer fails the step
cmd=("$python" -u -m deepspeed.launcher.runner --hostfile "$hostfile" --num_nodes "${#host_list[@]}"
     --num_gpus "$gpus" --master_addr "$master_addr" --master_port "$master_port")
if [[ -n $node_rank ]]; then
    cmd+=(--no_ssh --node_rank "$node_rank")
else
    # Variables the ranks need that DeepSpeed does not forward over pdsh by itself.
    env_file=$log_dir/deepspeed_env
    forward=(TORCH_EXTENSIONS_DIR GLOO_SOCKET_IFNAME OMP_NUM_THREADS TORCH_NCCL_ASYNC_ERROR_HANDLING
             HF_HOME PYTHONPATH)
    read -r -a extra_names <<< "${MDLM_FORWARD_ENV:-}"
    : > "$env_file"
    for name in "${forward[@]}" "${extra_names[@]}"; do
        if [[ -n ${!name:-} ]]; then
            echo "$name=${!name}" >> "$env_file"
        fi
    done
    export DS_ENV_FILE=$env_file  # an absolute path: DeepSpeed reads it instead of ~/.deepspeed_env
fi
if [[ $rank_logs -eq 1 ]]; then
    cmd+=(--enable_each_rank_log "$log_dir/ranks")
fi
cmd+=(pipeline/train.py "$@")

echo "deepspeed-hostfile: ${#host_list[@]} node(s) x $gpus, master $master_addr:$master_port," \
     "${node_rank:+node rank $node_rank (no ssh), }hostfile $hostfile"
echo "deepspeed-hostfile: ${cmd[*]}"
if [[ $dry_run -eq 1 ]]; then
    exit 0
fi
cd "$repo"
if [[ -z $node_rank ]]; then
    exec "${cmd[@]}"  # DeepSpeed's runner passes stop signals on over pdsh itself
fi
# No ssh: DeepSpeed's runner passes no stop signal on in this mode (as a container's PID 1 it
# would not even end), and its launch.py kills the ranks 30 s after one. A stop signal here goes
# to the ranks themselves (its grandchildren), which checkpoint and exit; the launchers follow.
"${cmd[@]}" &
runner=$!
trap 'bash "$repo/cluster/stop-ranks.sh" "$runner" 2 &' TERM INT
while kill -0 "$runner" 2>/dev/null; do
    wait "$runner" || true  # returns early when a trapped signal arrives
done
rc=0
wait "$runner" || rc=$?
exit "$rc"
