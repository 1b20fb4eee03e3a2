#!/usr/bin/env bash
# The first GPU run's checks, one command, on one H100 / H200 (about 10 minutes):
#   versions; TE vs SDPA spec, padded vs packed, fp32 and bf16; FlexAttention vs SDPA math;
#   LoRA under TE; gpu_smoke.sh; throughput.py --sizes 0.6B --profile without and with
#   recompute; the generative reranker's throughput at 0.6B and 8B; global_negatives.py
#   --max_batch. Writes bench/results/<device>-<date>.json and
#   exits non-zero when a check fails (see bench/gpu_check.py).
#
#   bench/gpu_check.sh              # needs CUDA
#   bench/gpu_check.sh --dry-run    # the same plan on CPU with the tiny model (what CI runs)
#
# PYTHON (default python3) runs everything.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONWARNINGS=ignore
exec "${PYTHON:-python3}" "$ROOT/bench/gpu_check.py" "$@"
