#!/usr/bin/env bash
# Any machine or cluster where you start one command per node yourself (plain torchrun
# style). megaemb starts the node's ranks; see launch/common.sh for the variables.
#
# One node, all its GPUs:
#   bash launch/torchrun.sh sft --config configs/qwen3-embedding-0.6B.yaml \
#       --model Qwen3-Embedding-0.6B --dataset train.jsonl --save out/
#
# Qwen3-Embedding-8B on 2 nodes x 8 GPUs (TP=4 with SP, DP=4): on each node, with its rank:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0.example MASTER_PORT=29500 \
#       bash launch/torchrun.sh sft --config configs/qwen3-embedding-8B.yaml \
#       --model Qwen3-Embedding-8B --dataset train.jsonl --save /shared/out-8b/
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0.example MASTER_PORT=29500 bash launch/torchrun.sh ...
#
# A Qwen3-MoE embedder on 2 nodes x 8 GPUs (TP=2 with SP, EP=8, DP=8; experts split over 8
# ranks):
#   NNODES=2 NODE_RANK=<0|1> MASTER_ADDR=node0.example bash launch/torchrun.sh sft \
#       --config configs/qwen3-moe-embedder.yaml --model Qwen3-MoE-embedder \
#       --dataset train.jsonl --save /shared/out-moe/
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch/common.sh
. "$here/common.sh"
megaemb_run "$@"
