"""Core attention on torch: SDPA, and FlexAttention for packed batches on CUDA.

A drop-in for megatron-core's ``DotProductAttention`` (same constructor and forward contract),
used when Transformer Engine is absent. Causal, GQA without repeating K/V in memory.

Padded batches (``packed_seq_params`` None) need no mask: under a causal mask a token never
sees the padding that follows it, and pooling reads the last real token. Packed batches
(``DocumentPacking``) add a document mask: token ``i`` sees token ``j`` only if ``j <= i`` and
both lie in the same document. On CUDA that is a FlexAttention block mask (sparse: blocks of
other documents are skipped), built once per forward pass and shared by every layer;
elsewhere, and with attention dropout, SDPA with a dense ``[T, T]`` boolean mask (exact, for CPU).

Layout (per tensor-parallel rank, ``np = heads / tp``, ``ng = query_groups / tp``):
    padded / packed "sbhd": query [sq, b, np, hn], key/value [sk, b, ng, hn] -> [sq, b, np * hn]
    packed "thd" (TE's format, megatron squeezes b = 1): query [T, np, hn] -> [T, np * hn]
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule

from megaemb import platform


@dataclass
class DocumentPacking(PackedSeqParams):
    """megatron's ``PackedSeqParams`` plus per-forward caches of the masks derived from it
    (one per device/kind), so the layers of one forward pass build it once."""

    masks: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def of(cls, cu_seqlens: torch.Tensor, max_seqlen: int, qkv_format: str) -> "DocumentPacking":
        return cls(qkv_format=qkv_format, cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                   max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen)

    def document_ids(self) -> torch.Tensor:
        """``[T]``: the document of every token."""
        if "doc" not in self.masks:
            cu = self.cu_seqlens_q.long()
            self.masks["doc"] = torch.repeat_interleave(
                torch.arange(cu.numel() - 1, device=cu.device), cu[1:] - cu[:-1])
        return self.masks["doc"]

    def dense_mask(self) -> torch.Tensor:
        """``[T, T]`` bool, True = may attend (same document, not in the future)."""
        if "dense" not in self.masks:
            doc = self.document_ids()
            pos = torch.arange(doc.numel(), device=doc.device)
            self.masks["dense"] = (doc[:, None] == doc[None, :]) & (pos[:, None] >= pos[None, :])
        return self.masks["dense"]

    def block_mask(self):
        """FlexAttention ``BlockMask`` of the same rule (CUDA)."""
        if "block" not in self.masks:
            from torch.nn.attention.flex_attention import create_block_mask

            doc = self.document_ids()

            def document_causal(b, h, q, kv):
                return (doc[q] == doc[kv]) & (q >= kv)

            self.masks["block"] = create_block_mask(document_causal, None, None, doc.numel(),
                                                    doc.numel(), device=doc.device)
        return self.masks["block"]


_compiled_flex = None
# one compiled kernel per packed length (``pack_length``: four per octave); torch's default
# of 8 recompiles would silently fall back to the unfused kernel beyond 8 lengths
FLEX_SHAPES = 64


def _flex_attention(*args, **kwargs):
    global _compiled_flex
    if _compiled_flex is None:
        import torch._dynamo.config
        from torch.nn.attention.flex_attention import flex_attention

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, FLEX_SHAPES)
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(*args, **kwargs)


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
        if attention_bias is not None:
            raise ValueError("SDPAAttention takes no attention bias")
        thd = query.dim() == 3  # megatron squeezed b = 1 for qkv_format "thd"
        if thd:
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
        sq, b, np_, hn = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]
        dropout_p = self.dropout_p if self.training else 0.0
        gqa = k.shape[1] != q.shape[1]

        def attend():
            if packed_seq_params is None:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p,
                                                      scale=self.softmax_scale, enable_gqa=gqa)
            if q.is_cuda and dropout_p == 0 and platform.has_flex_attention():
                return _flex_attention(q, k, v, block_mask=packed_seq_params.block_mask(),
                                       scale=self.softmax_scale, enable_gqa=gqa)
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=packed_seq_params.dense_mask(), dropout_p=dropout_p,
                scale=self.softmax_scale, enable_gqa=gqa)

        if dropout_p > 0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = attend()
        else:
            context = attend()
        context = context.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)
        return context.squeeze(1) if thd else context
