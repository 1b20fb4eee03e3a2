"""Training FLOPs of one forward+backward, for MFU (nanochat style: next to the model).

FLOPs = 6 * N_matmul * tokens + 6 * layers * heads * head_dim * sum(len_i^2)
        + 6 * head_rows * hidden * texts
  N_matmul: weights used in matmuls per token (attention projections, MLP or the top-k
            experts' MLPs, router), no embedding lookup and no vocabulary GEMM (there is none).
  attention: QK^T and AV are 2 * 2 * s^2 * heads * head_dim forward, x3 with backward, /2 causal.
  head:     a task's head multiplies each text's last hidden state by ``head_rows`` rows of
            the output layer (the generative reranker: 2, "yes" and "no"): 2 * 2h forward per
            pair, x3 with backward (``tasks.Task.head_rows``; 0 for pooled embeddings).
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


def train_flops(shape: Qwen3Shape, lengths: list[int], head_rows: int = 0) -> float:
    """FLOPs of forward+backward over sequences of the given real lengths, each scored by a
    head of ``head_rows`` output-layer rows at its last token (0: none)."""
    tokens = sum(lengths)
    attn = 6 * shape.num_layers * shape.num_heads * shape.head_dim * sum(n * n for n in lengths)
    head = 6 * head_rows * shape.hidden_size * len(lengths)
    return 6.0 * matmul_params_per_token(shape) * tokens + attn + head


def vocab_logits_bytes(shape: Qwen3Shape, tokens: int, tensor_parallel: int = 1,
                       bytes_per_value: int = 2) -> int:
    """Bytes of the ``[tokens, V/tp]`` vocabulary logits per rank that a causal-LM head builds
    over ``tokens`` tokens (megatron's vocab-parallel output layer; 2 bytes bf16, 4 fp32).
    megaemb's generative reranker head (``model.heads.YesNoHead``) builds none of them: it
    multiplies each pair's last hidden state by two rows of the output layer."""
    return tokens * (shape.padded_vocab_size // tensor_parallel) * bytes_per_value
