"""Last-token pooling, Matryoshka truncation and L2 normalisation.

Qwen3-Embedding appends ``<|endoftext|>`` (id 151643) to every text and embeds with the
final-norm hidden state of that token. Batches are right-padded, so the last real token of
row ``i`` sits at ``lengths[i] - 1``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def last_token_pool(hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """hidden ``[s, b, h]`` (full sequence, not SP-scattered), lengths ``[b]`` -> ``[b, h]``."""
    idx = (lengths.to(hidden.device) - 1).clamp(min=0)
    return hidden[idx, torch.arange(hidden.shape[1], device=hidden.device)]


def finish_embedding(pooled: torch.Tensor, dim: int | None = None, normalize: bool = True) -> torch.Tensor:
    """``[b, h]`` -> ``[b, dim]``: keep the first ``dim`` features (Matryoshka), then L2-normalise."""
    if dim is not None:
        if not 0 < dim <= pooled.shape[-1]:
            raise ValueError(f"Matryoshka dimension {dim} outside 1..{pooled.shape[-1]}")
        pooled = pooled[..., :dim]
    return F.normalize(pooled.float(), dim=-1) if normalize else pooled
