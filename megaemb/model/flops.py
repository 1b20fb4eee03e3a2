"""Training FLOPs of one forward+backward, for MFU (nanochat style: next to the model).

FLOPs = 6 * N_matmul * tokens + 6 * layers * heads * head_dim * sum(len_i^2)
  N_matmul: weights used in matmuls per token (attention projections, MLP or the top-k
            experts' MLPs, router), no embedding lookup and no vocabulary GEMM (there is none).
  attention: QK^T and AV are 2 * 2 * s^2 * heads * head_dim forward, x3 with backward, /2 causal.
"""
from __future__ import annotations

from megaemb.shape import Qwen3Shape


def matmul_params_per_token(shape: Qwen3Shape) -> int:
    h, attn = shape.hidden_size, shape.attention_params
    total = 0
    for layer in range(shape.num_layers):
        if shape.is_moe_layer(layer):
            mlp = shape.moe_topk * 3 * h * shape.moe_ffn_hidden_size + h * shape.num_experts
        else:
            mlp = 3 * h * shape.ffn_hidden_size
        total += attn + mlp
    return total


def train_flops(shape: Qwen3Shape, lengths: list[int]) -> float:
    """FLOPs of forward+backward over sequences of the given real lengths."""
    tokens = sum(lengths)
    attn = 6 * shape.num_layers * shape.num_heads * shape.head_dim * sum(n * n for n in lengths)
    return 6.0 * matmul_params_per_token(shape) * tokens + attn
