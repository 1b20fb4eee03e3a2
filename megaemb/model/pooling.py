"""Last-token pooling, Matryoshka truncation and L2 normalisation.

Qwen3-Embedding appends ``<|endoftext|>`` (id 151643) to every text and embeds with the
final-norm hidden state of that token. Where that token sits in a padded or packed batch is
the batch's ``pool_index`` (``megaemb.data.batching.TextBatch``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def last_token_pool(hidden: torch.Tensor, pool_index: torch.Tensor) -> torch.Tensor:
    """hidden ``[s, b, h]`` (full sequence, not SP-scattered), pool_index ``[n]`` (flat,
    s-major: ``position * b + row``) -> ``[n, h]``."""
    return hidden.reshape(-1, hidden.shape[-1])[pool_index.to(hidden.device)]


def finish_embedding(pooled: torch.Tensor, dim: int | None = None, normalize: bool = True) -> torch.Tensor:
    """``[b, h]`` -> ``[b, dim]``: keep the first ``dim`` features (Matryoshka), then L2-normalise."""
    if dim is not None:
        if not 0 < dim <= pooled.shape[-1]:
            raise ValueError(f"Matryoshka dimension {dim} outside 1..{pooled.shape[-1]}")
        pooled = pooled[..., :dim]
    return F.normalize(pooled.float(), dim=-1) if normalize else pooled
