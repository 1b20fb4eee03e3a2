#!/usr/bin/env bash
# One node: NPROC_PER_NODE=8 bash launch/torchrun.sh sft --config configs/qwen3-embedding-0.6B.yaml ...
# Many nodes: run on every node with NNODES, NODE_RANK, MASTER_ADDR (and MASTER_PORT) set.
set -euo pipefail
export NPROC_PER_NODE=${NPROC_PER_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}
exec megaemb "$@"
