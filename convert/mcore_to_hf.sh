#!/usr/bin/env bash
# Megatron-Core checkpoint (any layout) -> HF + sentence-transformers files. Streamed in one
# process, one checkpoint tensor at a time.
#   bash convert/mcore_to_hf.sh MCORE_DIR HF_DIR [megaemb export flags, e.g. --bf16 true]
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 MCORE_DIR HF_DIR [megaemb export flags ...]" >&2
    exit 2
fi
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch/common.sh
. "$here/../launch/common.sh"
src="$1" dst="$2"
shift 2
if [ "$(node_rank)" != 0 ]; then  # started on every node of a job: node 0 does the export
    echo "megaemb: node $(node_rank): nothing to do (node 0 exports)" >&2
    exit 0
fi
# one plain process: forget the job's node variables (PAI-DLC's WORLD_SIZE/RANK, Slurm's)
unset WORLD_SIZE RANK LOCAL_RANK MASTER_ADDR MASTER_PORT NNODES NODE_RANK SLURM_NNODES SLURM_NODEID \
    SLURM_JOB_NODELIST
NPROC_PER_NODE=1 megaemb_run export --mcore_model "$src" --to_hf true --output_dir "$dst" "$@"
