"""Token-id lists -> right-padded tensors, and one training step's micro-batches."""
from __future__ import annotations

import torch

from megaemb.data.sampler import micro_batches


def pad_batch(seqs: list[list[int]], pad_id: int, multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """-> ``input_ids [b, s]`` (s = longest, rounded up to ``multiple``), ``lengths [b]``."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    s = int(lengths.max()) if seqs else 0
    s = (s + multiple - 1) // multiple * multiple
    ids = torch.full((len(seqs), s), pad_id, dtype=torch.long)
    for i, row in enumerate(seqs):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return ids, lengths


def make_micro_batch(rows: list, pad_id: int, pad_multiple: int) -> dict:
    seqs = [r.query for r in rows] + [r.doc for r in rows] + [n for r in rows for n in r.negatives]
    ids, lengths = pad_batch(seqs, pad_id, pad_multiple)
    labels = torch.tensor([r.label for r in rows], dtype=torch.float32) if rows[0].label is not None else None
    return {"ids": ids, "lengths": lengths, "m": len(rows), "k": len(rows[0].negatives), "labels": labels}


def step_micro_batches(rows: list, micro_batch_size: int, pad_id: int, pad_multiple: int) -> list[dict]:
    """This rank's examples of one step -> micro-batches of ``micro_batch_size`` examples, all
    padded to the step's longest text (pipeline stages exchange ``[s, b, h]`` of one shape)."""
    batches = [make_micro_batch(mb, pad_id, pad_multiple) for mb in micro_batches(rows, micro_batch_size)]
    seq_len = max(b["ids"].shape[1] for b in batches)
    for b in batches:
        if b["ids"].shape[1] < seq_len:
            b["ids"] = torch.nn.functional.pad(b["ids"], (0, seq_len - b["ids"].shape[1]), value=pad_id)
    return batches
