"""Core attention on ``torch.nn.functional.scaled_dot_product_attention``.

A drop-in for megatron-core's ``DotProductAttention`` (same constructor and forward contract),
used when Transformer Engine is absent. Causal, GQA through SDPA's ``enable_gqa`` (no
repeat of K/V in memory). Right-padded batches need no mask: under a causal mask a token never
sees the padding that follows it, and pooling reads the last real token.

Layout (per tensor-parallel rank, ``np = heads / tp``, ``ng = query_groups / tp``):
    query [sq, b, np, hn], key/value [sk, b, ng, hn]  ->  context [sq, b, np * hn]
"""
from __future__ import annotations

import math

import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule


class SDPAAttention(MegatronModule):
    def __init__(self, config, layer_number, attn_mask_type, attention_type,
                 attention_dropout=None, softmax_scale=None, cp_comm_type=None, pg_collection=None):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("context parallelism needs Transformer Engine attention")
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAAttention takes padded batches only (no packed_seq_params, no bias)")
        sq, b, np_, hn = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]
        dropout_p = self.dropout_p if self.training else 0.0

        def attend():
            return F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=dropout_p, scale=self.softmax_scale,
                enable_gqa=k.shape[1] != q.shape[1])

        if dropout_p > 0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = attend()
        else:
            context = attend()
        return context.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)
