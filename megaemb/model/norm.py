"""RMSNorm for megatron-core layer specs without Transformer Engine or apex.

megatron-core's fallback (``WrappedTorchNorm``) refuses sequence parallelism. Under sequence
parallelism each tensor-parallel rank normalises a different slice of tokens, so the weight
gradients of hidden-state norms differ between TP ranks and must be all-reduced: megatron does
that for parameters marked ``sequence_parallel = True``. Per-head q/k norms run after the
all-gather on every token, so their gradients already agree and they are not marked.
"""
from __future__ import annotations

import torch

from megaemb import platform


class RMSNorm(torch.nn.RMSNorm):
    """Norm over the hidden size of ``[s, b, h]`` (``[s/tp, b, h]`` under sequence parallel)."""

    marks_sequence_parallel = True

    def __init__(self, config, hidden_size: int, eps: float = 1e-6):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype, device=platform.device())
        self.weight.sequence_parallel = self.marks_sequence_parallel and config.sequence_parallel


class HeadRMSNorm(RMSNorm):
    """Qwen3's q_norm / k_norm over ``head_dim`` of ``[s, b, heads, head_dim]``."""

    marks_sequence_parallel = False
