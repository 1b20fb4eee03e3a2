"""The checks that end ``bench/gpu_smoke.sh``; exits 1 naming the first that fails.

1. The training loss fell: the mean of the second half of ``train/loss`` (TensorBoard events
   that ``megaemb sft`` writes under ``<save>/tensorboard``) is below the first half's.
2. ``megaemb embed`` (``--embeddings``, ``[n, h]`` float32) agrees with transformers: the HF
   export loaded in ``AutoModel`` (SDPA, padded batches, last-token pooling, same dtype as the
   run) embeds the same texts with cosine >= ``--min_cos`` for every text.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import numpy as np
import torch
import torch.nn.functional as F

from megaemb.cli import str2bool
from megaemb.data.batching import pad_batch
from megaemb.data.tokenize import EmbeddingTokenizer
from megaemb.embed import read_texts


def training_losses(run_dir: str) -> list[float]:
    """``train/loss`` by step from ``<run_dir>/tensorboard``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(run_dir, "tensorboard"))
    events.Reload()
    return [e.value for e in sorted(events.Scalars("train/loss"), key=lambda e: e.step)]


@torch.no_grad()
def transformers_embeddings(hf_dir: str, seqs: list, pad_id: int, bf16: bool,
                            batch_size: int = 16) -> np.ndarray:
    """``n`` token-id lists -> ``[n, h]`` float32, L2-normalised."""
    from transformers import AutoModel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModel.from_pretrained(hf_dir, dtype=torch.bfloat16 if bf16 else torch.float32,
                                      attn_implementation="sdpa").to(device).eval()
    out = []
    for i in range(0, len(seqs), batch_size):
        batch = pad_batch(seqs[i:i + batch_size], pad_id).to(device)
        ids, lengths = batch.input_ids, batch.lengths
        mask = (torch.arange(ids.shape[1], device=device)[None] < lengths[:, None]).long()
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        out.append(F.normalize(hidden[torch.arange(len(ids), device=device), lengths - 1].float(), dim=-1))
    return torch.cat(out).cpu().numpy()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--run", required=True, help="megaemb sft --save directory")
    p.add_argument("--hf", required=True, help="HF export of the run")
    p.add_argument("--input", required=True, help="the texts given to megaemb embed")
    p.add_argument("--text_field", default="text")
    p.add_argument("--embeddings", required=True, help="megaemb embed --output")
    p.add_argument("--max_length", type=int, required=True)
    p.add_argument("--bf16", type=str2bool, default=False)
    p.add_argument("--min_cos", type=float, default=0.999)
    args = p.parse_args(argv)

    losses = training_losses(args.run)
    half = max(1, len(losses) // 2)
    first, last = statistics.mean(losses[:half]), statistics.mean(losses[-half:])
    print(f"smoke_check: {len(losses)} steps, mean loss {first:.4f} (first {half}) -> {last:.4f} "
          f"(last {half})", flush=True)
    if not last < first:
        print("smoke_check: FAILED: the training loss did not fall", file=sys.stderr)
        return 1

    tok = EmbeddingTokenizer(args.hf, args.max_length)
    ref = transformers_embeddings(args.hf, tok.encode(read_texts(args.input, args.text_field)),
                                  tok.pad_id, args.bf16)
    ours = np.load(args.embeddings)
    if ours.shape != ref.shape:
        print(f"smoke_check: FAILED: embeddings {ours.shape}, transformers {ref.shape}", file=sys.stderr)
        return 1
    cos = (ours * ref).sum(-1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(ref, axis=-1)
    print(f"smoke_check: megaemb embed vs transformers ({'bf16' if args.bf16 else 'fp32'}), "
          f"{len(cos)} texts: min cos {cos.min():.6f}, mean {cos.mean():.6f}", flush=True)
    if not cos.min() >= args.min_cos:
        print(f"smoke_check: FAILED: min cos {cos.min():.6f} < {args.min_cos}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
