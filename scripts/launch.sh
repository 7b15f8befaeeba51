#!/usr/bin/env bash
# Launch r1fast GRPO training with torchrun, on one node or on many.
#
#   scripts/launch.sh RECIPE [--section.key=value ...]
#
# One node (the defaults): one process per visible GPU, or one process on a CPU-only machine
# (the trainer picks NCCL with CUDA and gloo without):
#   scripts/launch.sh recipes/qwen3_30b_a3b.toml --run.init_from=/ckpt/Qwen3-30B-A3B
#   NPROC_PER_NODE=4 scripts/launch.sh recipes/tiny_tp2ep2.toml --run.steps=2     # CPU, gloo
#
# Many nodes: run the same command on every node, NODE_RANK differing (scripts/slurm.sbatch
# does this under Slurm):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 scripts/launch.sh recipes/qwen3_30b_a3b.toml
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 scripts/launch.sh recipes/qwen3_30b_a3b.toml
#
# Environment (default):
#   NNODES          nodes in the job (1)
#   NODE_RANK       this node's index, 0..NNODES-1 (0)
#   NPROC_PER_NODE  processes on this node (GPUs visible to CUDA_VISIBLE_DEVICES/nvidia-smi,
#                   else 1)
#   MASTER_ADDR     host of node 0 (127.0.0.1)
#   MASTER_PORT     rendezvous port on MASTER_ADDR (29500)
#   LOG_DIR         per-rank logs, LOG_DIR/<run id>_<random>/attempt_0/<local rank>/{stdout,stderr}.log
#                   (logs/<recipe>-<date>-<time>/node<NODE_RANK>)
#   MAX_RESTARTS    torchrun restarts of the whole node group after a failure (0)
#   RUN_ID          names the torchrun log folder and rendezvous (the recipe's name)
#   PYTHON          interpreter (the repository's .venv when present, else python3)
#   LAUNCH_DRY_RUN  1: print the settings and the torchrun command, run nothing (0)
# and, unless already set: OMP_NUM_THREADS (cores / processes), CUDA_DEVICE_MAX_CONNECTIONS=1
# (megatron needs it to overlap TP/SP communication with compute), TORCH_NCCL_ASYNC_ERROR_HANDLING=1
# and NCCL_ASYNC_ERROR_HANDLING=1 (a failed collective aborts the job instead of hanging),
# TORCH_NCCL_AVOID_RECORD_STREAMS=1, NCCL_DEBUG=WARN, PYTHONUNBUFFERED=1.
set -euo pipefail

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
    exit "${1:-2}"
}

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
    usage "$([[ $# -ge 1 ]] && echo 0 || echo 2)"
fi
RECIPE=$1
shift
if [[ ! -f "$RECIPE" ]]; then
    echo "launch.sh: recipe not found: $RECIPE" >&2
    exit 2
fi

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

count_gpus() {
    if [[ -n "${CUDA_VISIBLE_DEVICES+x}" ]]; then
        # an empty list hides every GPU; "0,1,2" is three
        if [[ -z "$CUDA_VISIBLE_DEVICES" || "$CUDA_VISIBLE_DEVICES" == "-1" ]]; then
            echo 0
        else
            local ids
            IFS=, read -r -a ids <<< "$CUDA_VISIBLE_DEVICES"
            echo "${#ids[@]}"
        fi
    elif command -v nvidia-smi > /dev/null 2>&1; then
        nvidia-smi -L 2> /dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}

if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE=$(count_gpus)
    [[ "$NPROC_PER_NODE" -ge 1 ]] || NPROC_PER_NODE=1
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
MAX_RESTARTS=${MAX_RESTARTS:-0}
for var in NPROC_PER_NODE NNODES NODE_RANK MASTER_PORT MAX_RESTARTS; do
    if ! [[ "${!var}" =~ ^[0-9]+$ ]]; then
        echo "launch.sh: $var must be a non-negative integer, got '${!var}'" >&2
        exit 2
    fi
done
if [[ "$NPROC_PER_NODE" -lt 1 || "$NNODES" -lt 1 || "$NODE_RANK" -ge "$NNODES" ]]; then
    echo "launch.sh: need NPROC_PER_NODE >= 1, NNODES >= 1 and 0 <= NODE_RANK < NNODES" \
        "(got $NPROC_PER_NODE, $NNODES, $NODE_RANK)" >&2
    exit 2
fi
# several nodes meet at node 0's address: a loopback one would leave the others waiting on
# themselves until the rendezvous times out, with no word
if [[ "$NNODES" -gt 1 && ( "$MASTER_ADDR" == 127.* || "$MASTER_ADDR" == localhost \
        || "$MASTER_ADDR" == ::1 ) ]]; then
    echo "launch.sh: NNODES=$NNODES needs MASTER_ADDR set to node 0's address reachable by" \
        "every node (got '$MASTER_ADDR')" >&2
    exit 2
fi

stem=$(basename "$RECIPE" .toml)
LOG_DIR=${LOG_DIR:-logs/${stem}-$(date +%Y%m%d-%H%M%S)/node${NODE_RANK}}
RUN_ID=${RUN_ID:-$stem}

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$REPO_ROOT/.venv/bin/python" ]]; then
        PYTHON="$REPO_ROOT/.venv/bin/python"
    else
        PYTHON=python3
    fi
fi

cores=$(nproc 2> /dev/null || echo 1)
threads=$((cores / NPROC_PER_NODE))
[[ "$threads" -ge 1 ]] || threads=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$threads}
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export PYTHONUNBUFFERED=1
# run from a checkout without installing: the repository root goes first on the path
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"

cmd=("$PYTHON" -m torch.distributed.run
    --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC_PER_NODE"
    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"
    --max-restarts "$MAX_RESTARTS" --rdzv-id "$RUN_ID"
    --log-dir "$LOG_DIR" --redirects 3 --tee 3
    -m r1fast.cli train "$RECIPE" "$@")

echo "launch.sh: node $NODE_RANK/$NNODES, $NPROC_PER_NODE process(es), master" \
    "$MASTER_ADDR:$MASTER_PORT, OMP_NUM_THREADS=$OMP_NUM_THREADS, logs in $LOG_DIR" >&2
if [[ "${LAUNCH_DRY_RUN:-0}" == "1" ]]; then
    for var in OMP_NUM_THREADS CUDA_DEVICE_MAX_CONNECTIONS TORCH_NCCL_ASYNC_ERROR_HANDLING \
        TORCH_NCCL_AVOID_RECORD_STREAMS NCCL_DEBUG PYTHONPATH; do
        echo "$var=${!var}"
    done
    printf '%q ' "${cmd[@]}"
    printf '\n'
    exit 0
fi
mkdir -p "$LOG_DIR"
exec "${cmd[@]}"
