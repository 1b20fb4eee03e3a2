"""Last-token pooling, Matryoshka truncation and L2 normalisation.

Qwen3-Embedding appends ``<|endoftext|>`` (id 151643) to every text and embeds with the
final-norm hidden state of that token. Where that token sits in a padded or packed batch is
the batch's ``pool_index`` (``megaemb.data.batching.TextBatch``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel


def last_token_pool(hidden: torch.Tensor, pool_index: torch.Tensor) -> torch.Tensor:
    """hidden ``[s, b, h]`` (full sequence, not SP-scattered), pool_index ``[n]`` (flat,
    s-major: ``position * b + row``) -> ``[n, h]``."""
    return hidden.reshape(-1, hidden.shape[-1])[pool_index.to(hidden.device)]


def sequence_parallel_pool(hidden: torch.Tensor, pool_index: torch.Tensor) -> torch.Tensor:
    """Last-token pooling of a sequence-parallel ``hidden [s/tp, b, h]`` (TP rank r holds
    positions ``r*s/tp ..``) -> ``[n, h]``, replicated over TP like ``last_token_pool`` of the
    whole sequence. Each rank picks the pooled rows it holds (zero rows for the others), and an
    all-reduce over TP sums them (exact: one non-zero term per row), so ``[n, h]`` crosses the
    group instead of ``[s, b, h]``. Backward: each rank's rows take the (replicated) gradient
    of their embedding, as megatron's reduce-from-TP region (all-reduce forward, copy back)."""
    local = hidden.reshape(-1, hidden.shape[-1])
    offset = pool_index.to(hidden.device) - parallel_state.get_tensor_model_parallel_rank() * local.shape[0]
    mine = (offset >= 0) & (offset < local.shape[0])
    rows = local[offset.clamp(0, local.shape[0] - 1)]
    return tensor_parallel.reduce_from_tensor_model_parallel_region(
        torch.where(mine.unsqueeze(1), rows, torch.zeros_like(rows)))


def finish_embedding(pooled: torch.Tensor, dim: int | None = None, normalize: bool = True) -> torch.Tensor:
    """``[b, h]`` -> ``[b, dim]``: keep the first ``dim`` features (Matryoshka), then L2-normalise."""
    if dim is not None:
        if not 0 < dim <= pooled.shape[-1]:
            raise ValueError(f"Matryoshka dimension {dim} outside 1..{pooled.shape[-1]}")
        pooled = pooled[..., :dim]
    return F.normalize(pooled.float(), dim=-1) if normalize else pooled
