"""Core attention on torch: SDPA, and FlexAttention for packed batches on CUDA.

A drop-in for megatron-core's ``DotProductAttention`` (same constructor and forward contract),
used when Transformer Engine is absent. Causal, GQA without repeating K/V in memory.

Padded batches (``packed_seq_params`` None) need no mask: under a causal mask a token never
sees the padding that follows it, and pooling reads the last real token. Packed batches
(``DocumentPacking``) add a document mask: token ``i`` sees token ``j`` only if ``j <= i`` and
both lie in the same document. On CUDA that is a FlexAttention block mask (sparse: blocks of
other documents are skipped) built from ``cu_seqlens`` in O(T) memory without a host sync,
once per forward pass and shared by every layer, and FlexAttention is compiled for any T
(``FLEX_GRAPHS``). Elsewhere (CPU), and with attention dropout (FlexAttention has none),
each document runs through causal SDPA on its own: exact, and no ``[T, T]`` tensor anywhere.

Layout (per tensor-parallel rank, ``np = heads / tp``, ``ng = query_groups / tp``):
    padded / packed "sbhd": query [sq, b, np, hn], key/value [sk, b, ng, hn] -> [sq, b, np * hn]
    packed "thd" (TE's format, megatron squeezes b = 1): query [T, np, hn] -> [T, np * hn]
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule

from megaemb import platform

BLOCK = 128  # FlexAttention's sparse block size (torch's _DEFAULT_SPARSE_BLOCK_SIZE)


@dataclass
class DocumentPacking(PackedSeqParams):
    """megatron's ``PackedSeqParams`` plus per-forward caches of what attention derives from
    it, so the layers of one forward pass build it once."""

    masks: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def of(cls, cu_seqlens: torch.Tensor, max_seqlen: int, qkv_format: str) -> "DocumentPacking":
        return cls(qkv_format=qkv_format, cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                   max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen)

    def boundaries(self) -> list[int]:
        """``cu_seqlens`` on the host (the per-document path loops over documents)."""
        if "host" not in self.masks:
            self.masks["host"] = self.cu_seqlens_q.tolist()
        return self.masks["host"]

    def block_mask(self, total: int):
        """FlexAttention ``BlockMask`` of the document-causal rule for ``total`` tokens (CUDA),
        built once per forward pass by ``document_block_mask``."""
        if "block" not in self.masks:
            self.masks["block"] = document_block_mask(self.cu_seqlens_q, total)
        return self.masks["block"]


def document_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """``[total]``: the document of every token, from the boundaries alone (``searchsorted``:
    no ``[T, T]`` tensor, and no host sync, unlike ``repeat_interleave`` on CUDA)."""
    cu = cu_seqlens.long()
    return torch.searchsorted(cu[1:], torch.arange(total, device=cu.device), right=True)


def document_block_mask(cu_seqlens: torch.Tensor, total: int, block: int = BLOCK):
    """The FlexAttention ``BlockMask`` of "token ``i`` sees token ``j`` iff ``j <= i`` in the
    same document", built from ``cu_seqlens`` in O(T) memory (plus the ``[T/block]^2`` block
    table the format holds), where ``create_block_mask`` evaluates the rule on every ``[T, T]``
    pair. Documents are contiguous, so for query block ``i`` (tokens ``[i*block, ...)``):

    - it sees kv blocks ``floor(s_first / block) .. i``, ``s_first`` the start of its first
      token's document (earlier tokens are other documents; later ones the future);
    - kv block ``j < i`` is *full* (no masking) iff its first token lies in the document of the
      block's last query, i.e. ``j >= ceil(s_last / block)``; every other block seen, the
      diagonal included, is *partial* and masked by ``mask_mod`` token by token.

    ``T`` need not be a multiple of ``block``: the kernel wraps the indices it hands
    ``mask_mod`` into range (``get_bounded_indices`` in torch/_inductor/kernel/flex/templates/
    utilities.py.jinja) and never stores rows past ``T``.
    """
    from torch.nn.attention.flex_attention import BlockMask

    cu = cu_seqlens.long()
    doc = document_ids(cu, total)
    n = -(-total // block)
    rows = torch.arange(n, device=cu.device)
    first = rows * block
    last = (first + block - 1).clamp(max=total - 1)
    lo = cu[doc[first]] // block
    full_lo = -(-cu[doc[last]] // block)
    j = rows[None, :]
    i = rows[:, None]
    full = (j >= full_lo[:, None]) & (j < i)
    partial = ((j >= lo[:, None]) & (j < full_lo[:, None]) & (j < i)) | (j == i)

    def document_causal(b, h, q, kv):
        return (doc[q] == doc[kv]) & (q >= kv)

    return BlockMask.from_kv_blocks(*_ordered(partial), *_ordered(full), BLOCK_SIZE=block,
                                    mask_mod=document_causal, seq_lengths=(total, total))


def _ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[n, n]`` bool block table -> (``num [1, 1, n]``, ``indices [1, 1, n, n]``) int32, each
    row's blocks first in ascending order (FlexAttention's sparse format)."""
    num = blocks.sum(-1, dtype=torch.int32)
    indices = torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return num[None, None], indices[None, None]


# FlexAttention is compiled once per grad mode, dtype and head layout, for every packed
# length (``dynamic=True``: T is symbolic, and with a symbolic T the CUDA kernel takes its
# bounds-checked variant, IS_DIVISIBLE=False, without guarding on T % 128: statically_known_true
# in torch/_inductor/kernel/flex/flex_attention.py). A model trains and evaluates in one dtype
# and head layout, so it needs 2 graphs; FLEX_GRAPHS leaves room for more. Past the limit torch
# would silently run the unfused eager kernel (a [T, T] score matrix per head): here an error.
FLEX_GRAPHS = 8
_compiled_flex = None
flex_graphs = 0  # graphs compiled so far in this process (logged as each one is added)


def _flex_attention(q, k, v, **kwargs):
    """Compiled ``flex_attention``; a graph beyond ``FLEX_GRAPHS`` raises instead of falling
    back, and each new graph is logged with the count."""
    global _compiled_flex, flex_graphs
    import torch._dynamo.config
    from torch._dynamo.utils import counters

    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled_flex = torch.compile(flex_attention, dynamic=True)
    before = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(recompile_limit=FLEX_GRAPHS, fail_on_recompile_limit_hit=True):
        out = _compiled_flex(q, k, v, **kwargs)
    if counters["stats"]["unique_graphs"] > before:
        flex_graphs += 1
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            print(f"FlexAttention: compiled graph {flex_graphs} of at most {FLEX_GRAPHS} "
                  f"({q.dtype}, grad {torch.is_grad_enabled()}, T={q.shape[2]}, any T reuses it)",
                  file=sys.stderr, flush=True)
    return out


def per_document(causal, q, k, v, boundaries: list[int]) -> torch.Tensor:
    """``causal`` attention of each document of ``[b, heads, T, hn]`` on its own, concatenated
    along T: exact, with no ``[T, T]`` mask (memory of one document's causal attention). With
    attention dropout on CUDA each call is an unmasked causal SDPA with GQA, which the flash
    kernel takes in bf16 (the docstring of ``F.scaled_dot_product_attention``: GQA runs on the
    flash and math kernels only, and a mask rules flash out), so K/V are never repeated and no
    ``[b, heads, T, T]`` fp32 math kernel runs; one call per text, so short texts are
    launch-bound there (Transformer Engine's THD kernels are the fast path with dropout)."""
    return torch.cat([causal(*(t[:, :, s:e] for t in (q, k, v)))
                      for s, e in zip(boundaries[:-1], boundaries[1:])], dim=2)


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

        def causal(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p,
                                                  scale=self.softmax_scale, enable_gqa=gqa)

        def attend():
            if packed_seq_params is None:
                return causal(q, k, v)
            if q.is_cuda and dropout_p == 0 and platform.has_flex_attention():
                return _flex_attention(q, k, v, block_mask=packed_seq_params.block_mask(sq),
                                       scale=self.softmax_scale, enable_gqa=gqa)
            return per_document(causal, q, k, v, packed_seq_params.boundaries())

        if dropout_p > 0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = attend()
        else:
            context = attend()
        context = context.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)
        return context.squeeze(1) if thd else context
