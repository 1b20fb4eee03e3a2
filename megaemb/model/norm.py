"""RMSNorm for megatron-core layer specs without Transformer Engine or apex.

megatron-core's fallback (``WrappedTorchNorm``) refuses sequence parallelism. Under sequence
parallelism each tensor-parallel rank normalises a different slice of tokens, so the weight
gradients of hidden-state norms differ between TP ranks and must be all-reduced: megatron does
that for parameters marked ``sequence_parallel = True``. Per-head q/k norms see every token
but only this rank's heads (``linear_qkv`` is split on heads), so each rank holds a partial sum
of their gradient, with or without sequence parallelism: megatron's ``finalize_model_grads``
sums the gradients of ``q_layernorm`` / ``k_layernorm`` over TP by name whenever
``config.qk_layernorm`` (megatron-core 0.16.1 ``distributed/finalize_model_grads.py``
``_allreduce_non_tensor_model_parallel_grads``), so they are not marked (marked, they would be
summed once all the same: one branch of that function takes both).
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
