#!/usr/bin/env bash
# HF -> Megatron-Core checkpoint, as a job of any size (each rank reads only its slices).
#   bash convert/hf_to_mcore.sh HF_DIR MCORE_DIR [megaemb export flags ...]
# One node, TP=2:   NPROC_PER_NODE=2 bash convert/hf_to_mcore.sh Qwen3-Embedding-8B mcore/ \
#                       --tensor_model_parallel_size 2 --test_convert_precision true
# Multi-node: the same variables as launch/ (NNODES/NODE_RANK/MASTER_ADDR, PAI-DLC, Slurm:
#   srun --ntasks-per-node=1 bash convert/hf_to_mcore.sh ...).
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 HF_DIR MCORE_DIR [megaemb export flags ...]" >&2
    exit 2
fi
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch/common.sh
. "$here/../launch/common.sh"
src="$1" dst="$2"
shift 2
megaemb_run export --model "$src" --to_mcore true --output_dir "$dst" "$@"
