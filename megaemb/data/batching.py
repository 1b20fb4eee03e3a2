"""Token-id lists -> right-padded tensors."""
from __future__ import annotations

import torch


def pad_batch(seqs: list[list[int]], pad_id: int, multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """-> ``input_ids [b, s]`` (s = longest, rounded up to ``multiple``), ``lengths [b]``."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    s = int(lengths.max()) if seqs else 0
    s = (s + multiple - 1) // multiple * multiple
    ids = torch.full((len(seqs), s), pad_id, dtype=torch.long)
    for i, row in enumerate(seqs):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return ids, lengths
