#!/usr/bin/env bash
# One-GPU smoke run of the whole megaemb chain on a random-weight Qwen3-Embedding-0.6B shape:
#   HF -> MCore (export --to_mcore, with the precision test) -> sft (bf16, packed, 20 steps on
#   64 debian-desc rows from bench/data) -> export --to_hf -> embed (the MCore checkpoint)
#   -> bench/smoke_check.py: the loss fell, and embed agrees with transformers on the HF
#   export (bf16, cos >= 0.999 for every text). Ends with the line "gpu_smoke: ok".
#
#   bench/gpu_smoke.sh                    # needs CUDA; PYTHONPATH gets the repo root
#   SMOKE_DEVICE=cpu bench/gpu_smoke.sh   # tiny model, fp32, 8 steps (what the tests run)
#
# PYTHON (default python3) runs everything; SMOKE_OUT keeps the outputs there (default: a
# temporary directory, removed at the end).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" NPROC_PER_NODE=1 PYTHONWARNINGS=ignore

case ${SMOKE_DEVICE:-cuda} in
  cuda) SIZE=0.6B BF16=true STEPS=20 ROWS=64 MAX_LENGTH=256 ;;
  cpu) SIZE=tiny BF16=false STEPS=8 ROWS=32 MAX_LENGTH=128
       export CUDA_VISIBLE_DEVICES="" ;;
  *) echo "gpu_smoke: SMOKE_DEVICE must be cuda or cpu, got ${SMOKE_DEVICE}" >&2; exit 2 ;;
esac
if [[ $SIZE != tiny ]] && ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu_smoke: no CUDA device (SMOKE_DEVICE=cpu runs the CPU version)" >&2
  exit 2
fi

if [[ -n ${SMOKE_OUT:-} ]]; then
  WORK=$SMOKE_OUT
  mkdir -p "$WORK"
else
  WORK=$(mktemp -d)
  trap 'rm -rf "$WORK"' EXIT
fi

megaemb() {
  echo "+ megaemb $* (at ${SECONDS}s)"
  "$PY" -m megaemb.cli "$@"
}

head -n "$ROWS" "$ROOT/bench/data/debian-desc-train-2k.jsonl" > "$WORK/train.jsonl"
"$PY" "$ROOT/bench/models.py" "$SIZE" "$WORK/hf"
megaemb export --model "$WORK/hf" --to_mcore true --output_dir "$WORK/mcore" --bf16 "$BF16" \
  --test_convert_precision true
megaemb sft --model "$WORK/mcore" --dataset "$WORK/train.jsonl" --loss_type infonce \
  --infonce_temperature 0.05 --micro_batch_size 4 --global_batch_size 8 --lr 1e-4 \
  --lr_decay_style constant --weight_decay 0 --train_iters "$STEPS" --max_length "$MAX_LENGTH" \
  --log_interval 1 --packing true --bf16 "$BF16" --save "$WORK/run"
megaemb export --mcore_model "$WORK/run" --to_hf true --output_dir "$WORK/hf_export" --bf16 "$BF16"
megaemb embed --model "$WORK/run" --input "$WORK/train.jsonl" --text_field response \
  --output "$WORK/embeddings.npy" --max_length "$MAX_LENGTH" --packing true --bf16 "$BF16"
"$PY" "$ROOT/bench/smoke_check.py" --run "$WORK/run" --hf "$WORK/hf_export" \
  --input "$WORK/train.jsonl" --text_field response --embeddings "$WORK/embeddings.npy" \
  --max_length "$MAX_LENGTH" --bf16 "$BF16" --min_cos 0.999
echo "gpu_smoke: ok (${SECONDS}s)"
