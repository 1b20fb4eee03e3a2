#!/usr/bin/env bash
# Alibaba Cloud PAI-DLC: the job's start command on every node. DLC injects MASTER_ADDR,
# MASTER_PORT, WORLD_SIZE (= nodes), RANK (= this node) and NPROC_PER_NODE (= GPUs per
# node); megaemb maps them onto torchrun's nodes / node rank (megaemb/launcher.py cites the
# source). Logs: $LOG_DIR/$JOB_NAME-node<RANK>.log (put LOG_DIR on shared storage).
#
# Qwen3-Embedding-8B, a DLC PyTorch job of 2 nodes x 8 GPUs (TP=4 with SP, DP=4),
# start command:
#   cd /mnt/code/megaemb && LOG_DIR=/mnt/data/logs bash launch/dlc.sh sft \
#       --config configs/qwen3-embedding-8B.yaml --model /mnt/data/Qwen3-Embedding-8B \
#       --dataset /mnt/data/train.jsonl --save /mnt/data/out-8b/
#
# A Qwen3-MoE embedder on 2 nodes x 8 GPUs (TP=2 with SP, EP=8, DP=8; experts over 8 ranks):
#   cd /mnt/code/megaemb && bash launch/dlc.sh sft --config configs/qwen3-moe-embedder.yaml \
#       --model /mnt/data/Qwen3-MoE-embedder --dataset /mnt/data/train.jsonl --save /mnt/data/out-moe/
#
# The same command run again after a failure resumes from the last complete checkpoint in
# --save (set the job's retry count in DLC to get that automatically).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch/common.sh
. "$here/common.sh"
megaemb_run "$@"
