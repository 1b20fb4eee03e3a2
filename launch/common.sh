# shellcheck shell=bash
# Sourced by launch/*.sh, launch/slurm.sbatch and convert/*.sh: what every megaemb job on a
# GPU node needs. megaemb itself reads the node topology (NNODES/NODE_RANK/MASTER_ADDR/
# MASTER_PORT, else PAI-DLC's WORLD_SIZE/RANK, else Slurm's SLURM_NNODES/SLURM_NODEID and
# the first host of SLURM_JOB_NODELIST) and starts NPROC_PER_NODE ranks on this node.
#
# Variables (all optional):
#   NPROC_PER_NODE   ranks on this node; default: the GPUs torch sees (CUDA_VISIBLE_DEVICES
#                    respected), 1 without a GPU
#   LOG_DIR          per-node logs go to $LOG_DIR/$JOB_NAME-node<rank>.log (default logs/)
#   JOB_NAME         default megaemb
#   MEGAEMB          the command (default megaemb; e.g. "python -m megaemb.cli")
#   RDZV_TIMEOUT     seconds the nodes wait for each other before giving up (default 600)
# NCCL settings that matter (exported only when unset):
#   NCCL_DEBUG=WARN                 INFO shows the transport chosen (IB, socket) per peer
#   TORCH_NCCL_ASYNC_ERROR_HANDLING=3  a failed or timed-out collective ends the rank,
#                                   and so the job, instead of hanging; megaemb's
#                                   --distributed_timeout_minutes bounds the wait
#   NCCL_SOCKET_IFNAME / NCCL_IB_HCA  set them when nodes have several interfaces, e.g.
#                                   NCCL_SOCKET_IFNAME=eth0 (or =^lo,docker), NCCL_IB_HCA=mlx5
#   NCCL_SHM_DISABLE=1              only in containers started without --ipc=host or a
#                                   large --shm-size (NCCL needs /dev/shm)

gpu_count() {
    python -c 'import torch; print(max(torch.cuda.device_count(), 1))' 2>/dev/null || echo 1
}

export NPROC_PER_NODE="${NPROC_PER_NODE:-$(gpu_count)}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-3}"
LOG_DIR="${LOG_DIR:-logs}"
JOB_NAME="${JOB_NAME:-megaemb}"
read -r -a MEGAEMB_CMD <<< "${MEGAEMB:-megaemb}"

# node_rank: this node's rank as megaemb reads it (NODE_RANK, PAI-DLC's RANK, Slurm's SLURM_NODEID)
node_rank() {
    if [ -n "${NNODES:-}${NODE_RANK:-}" ]; then echo "${NODE_RANK:-0}"
    elif [ -n "${WORLD_SIZE:-}${RANK:-}" ]; then echo "${RANK:-0}"
    else echo "${SLURM_NODEID:-0}"
    fi
}

# megaemb_run ARGS...: run megaemb on this node, its output also in this node's log file;
# returns megaemb's exit code. SIGTERM / SIGINT to this script are passed on to megaemb (which
# stops its ranks), so stopping the script stops the job.
megaemb_run() {
    local node log pid code=0
    node="$(node_rank)"
    mkdir -p "$LOG_DIR"
    log="$LOG_DIR/$JOB_NAME-node$node.log"
    echo "megaemb: node $node, ranks per node: $NPROC_PER_NODE, log $log" >&2
    "${MEGAEMB_CMD[@]}" "$@" > >(tee -a "$log") 2>&1 &
    pid=$!
    trap 'kill -TERM "$pid" 2>/dev/null' TERM INT
    wait "$pid" || code=$?
    while kill -0 "$pid" 2>/dev/null; do  # woken by a signal: wait for megaemb to finish
        code=0
        wait "$pid" || code=$?
    done
    trap - TERM INT
    return "$code"
}
