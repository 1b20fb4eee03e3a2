"""Token-id lists -> the tensors of one forward pass, padded or packed, and one training
step's micro-batches.

Two layouts of the same ``n`` texts (lengths ``l_i``, each ending with its pooled token):

    padded   input_ids [n, s]   s = max l_i; row i holds text i, then pad ids
    packed   input_ids [1, T]   T = sum l_i rounded up to a bucket size (see ``pack_length``);
                                texts back to back, RoPE positions restarting at each text,
                                the rounding tail one extra document of pad ids

The model reads both through one type, ``TextBatch``: ``pool_index`` points at each text's
end token in the ``[s, b]`` token grid, ``cu_seqlens`` (packed only) at the document
boundaries its attention must respect (no token sees another document).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

import numpy as np
import torch

from megaemb.data.sampler import micro_batches

MIN_PACK = 64  # the smallest packed length
PACK_STEPS = 4  # bucket sizes per octave: 64, 80, 96, 112, 128, 160, ... (<= 25% rounding)


def pack_length(tokens: int, multiple: int = 1) -> int:
    """The bucket size >= ``tokens``: ``2^k * (1 + j / PACK_STEPS)``, at least ``MIN_PACK``,
    rounded up to ``multiple`` (sequence parallel splits it over TP ranks). A few sizes
    recur, so shape-specialised kernels are reused (FlexAttention itself is compiled for any
    T: ``model.attention.FLEX_GRAPHS``)."""
    size = MIN_PACK
    while size < tokens:
        octave = 1 << (size.bit_length() - 1)
        size += octave // PACK_STEPS
    return -(-size // multiple) * multiple


@dataclass
class TextBatch:
    """``n`` texts laid out for one forward pass (tensors on one device).

    input_ids    [b, s] long      padded: b = n; packed: b = 1, s = T
    lengths      [n] long         real tokens of each text, end token included
    pool_index   [n] long         each text's end token in the s-major token grid:
                                  hidden ``[s, b, h]``.reshape(s * b, h)[pool_index] -> [n, h]
    position_ids [b, s] long | None   RoPE positions; None = 0..s-1 in every row (padded)
    cu_seqlens   [d + 1] int32 | None packed: document boundaries (d = n, or n + 1 with a
                                  padding tail); None = padded (causal attention suffices)
    max_seqlen   int              padded: s; packed: the longest document's bucket size
                                  (``pack_length``, at most T), so that kernels chosen by it
                                  (Transformer Engine's attention backend) recur
    """

    input_ids: torch.Tensor
    lengths: torch.Tensor
    pool_index: torch.Tensor
    position_ids: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None

    @property
    def num_texts(self) -> int:
        return self.lengths.numel()

    def to(self, device) -> "TextBatch":
        return self._map(lambda t: t.to(device, non_blocking=True))

    def pin_memory(self) -> "TextBatch":
        """The same batch in page-locked host memory (an asynchronous copy to the GPU)."""
        return self._map(torch.Tensor.pin_memory)

    def _map(self, fn) -> "TextBatch":
        return replace(self, **{k: fn(v) for k, v in vars(self).items() if isinstance(v, torch.Tensor)})


def _as_list(seq) -> list[int]:
    return seq.tolist() if hasattr(seq, "tolist") else list(seq)


def pad_batch(seqs: list, pad_id: int, multiple: int = 1) -> TextBatch:
    """Right-padded ``[n, s]``, s = longest rounded up to ``multiple``. Causal attention keeps
    every real token from seeing the padding after it."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    n = len(seqs)
    s = -(-int(lengths.max()) // multiple) * multiple if n else 0
    ids = torch.full((n, s), pad_id, dtype=torch.long)
    for i, row in enumerate(seqs):
        ids[i, : len(row)] = torch.tensor(_as_list(row), dtype=torch.long)
    pool_index = (lengths - 1) * n + torch.arange(n)
    return TextBatch(ids, lengths, pool_index, max_seqlen=s)


def pack_batch(seqs: list, pad_id: int, multiple: int = 1) -> TextBatch:
    """One row ``[1, T]``, ``T = pack_length(sum of lengths, multiple)``."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    real = int(lengths.sum())
    total = pack_length(real, multiple)
    ids = torch.full((1, total), pad_id, dtype=torch.long)
    if seqs:
        ids[0, :real] = torch.cat([torch.as_tensor(s, dtype=torch.long) for s in seqs])
    docs = lengths.tolist() + ([total - real] if total > real else [])
    sizes = torch.tensor(docs, dtype=torch.long)
    cu = torch.zeros(len(docs) + 1, dtype=torch.int32)
    cu[1:] = sizes.cumsum(0)
    starts = torch.repeat_interleave(cu[:-1].long(), sizes)
    positions = (torch.arange(total) - starts).unsqueeze(0)
    return TextBatch(ids, lengths, cu[1:len(seqs) + 1].long() - 1, position_ids=positions,
                     cu_seqlens=cu, max_seqlen=min(pack_length(max(docs)), total))


def text_batch(seqs: list, pad_id: int, *, packed: bool, multiple: int = 1) -> TextBatch:
    """``seqs``: token-id lists (or 1-D arrays), each ending with its end token."""
    return (pack_batch if packed else pad_batch)(seqs, pad_id, multiple)


@dataclass
class GroupBatch:
    """One training micro-batch of ``m`` groups. Its ``texts`` are, in order,
    ``[q_1..q_m, p_1..p_m, n_11..n_1k, ..., n_m1..n_mk]`` (``m * (2 + k)`` texts), ``keys``
    their content keys (``text_keys``); ``labels [m]`` for the pair losses, else None."""

    texts: TextBatch
    m: int
    k: int
    labels: torch.Tensor | None
    keys: torch.Tensor


def text_keys(seqs: list) -> torch.Tensor:
    """int64 ``[n]``: a 64-bit content hash of each token sequence, the same on every rank
    (equal token ids, equal keys), so the loss can tell copies of one text apart from other
    texts (``loss.GroupLoss``)."""
    digests = (hashlib.blake2b(np.asarray(s, dtype=np.int32).tobytes(), digest_size=8).digest()
               for s in seqs)
    return torch.tensor([int.from_bytes(d, "little", signed=True) for d in digests], dtype=torch.int64)


def group_texts(rows: list) -> tuple[list, int, int, torch.Tensor | None]:
    """``m`` groups -> (their texts ``[q_1..q_m, p_1..p_m, n_11..n_1k, ..., n_m1..n_mk]``,
    ``m``, ``k``, labels ``[m]`` or None): the layout ``GroupBatch`` and the loss share."""
    seqs = [r.query for r in rows] + [r.doc for r in rows] + [n for r in rows for n in r.negatives]
    labels = torch.tensor([r.label for r in rows], dtype=torch.float32) if rows[0].label is not None else None
    return seqs, len(rows), len(rows[0].negatives), labels


def make_micro_batch(rows: list, pad_id: int, *, packed: bool = False, multiple: int = 1) -> GroupBatch:
    seqs, m, k, labels = group_texts(rows)
    return GroupBatch(text_batch(seqs, pad_id, packed=packed, multiple=multiple), m, k, labels,
                      text_keys(seqs))


def step_micro_batches(rows: list, micro_batch_size: int, pad_id: int, *, packed: bool = False,
                       multiple: int = 1) -> list[GroupBatch]:
    """This rank's examples of one step -> micro-batches of ``micro_batch_size`` examples, each
    laid out on its own (pipeline stages exchange shapes: ``variable_seq_lengths``)."""
    return [make_micro_batch(mb, pad_id, packed=packed, multiple=multiple)
            for mb in micro_batches(rows, micro_batch_size)]


# ---------------------------------------------------------------- micro-batches of texts
# Gradient caching (``megaemb.step``) embeds a rank's texts in any grouping, so its
# micro-batches are lists of text indices into ``group_texts``' layout.

def group_chunks(m: int, k: int, micro_batch_size: int) -> list[list[int]]:
    """Text indices of each micro-batch of ``micro_batch_size`` consecutive groups, in the
    micro-batch's own group layout (the texts ``make_micro_batch`` would hold)."""
    chunks = []
    for start in micro_batches(list(range(m)), micro_batch_size):
        g = range(start[0], start[-1] + 1)
        chunks.append(list(g) + [m + i for i in g] + [2 * m + i * k + j for i in g for j in range(k)])
    return chunks


def chunk_cost(lengths: list[int], *, packed: bool, multiple: int = 1) -> int:
    """Tokens one micro-batch of texts with these ``lengths`` computes: packed, its bucket
    size ``pack_length(sum)``; padded, rows x longest (rounded to ``multiple``)."""
    if not lengths:
        return 0
    if packed:
        return pack_length(sum(lengths), multiple)
    return len(lengths) * -(-max(lengths) // multiple) * multiple


def token_chunks(lengths: list[int], max_tokens: int, *, packed: bool, multiple: int = 1,
                 count: int = 0) -> list[list[int]]:
    """Text indices cut into micro-batches that each compute at most ``max_tokens`` tokens
    (``chunk_cost``; a text costlier on its own is a micro-batch alone).

    Texts go longest first (padded micro-batches then hold similar lengths), each micro-batch
    filled greedily. With ``count`` above the greedy number, the costliest micro-batches are
    halved until there are ``count`` (ranks that must run equally many micro-batches, e.g.
    expert-parallel ones, pass the largest count of the group); ``count`` <= ``len(lengths)``.
    """
    if count > len(lengths):
        raise ValueError(f"cannot cut {len(lengths)} texts into {count} micro-batches")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    chunks: list[list[int]] = []
    for i in order:
        if chunks and chunk_cost([lengths[j] for j in chunks[-1] + [i]], packed=packed,
                                 multiple=multiple) <= max_tokens:
            chunks[-1].append(i)
        else:
            chunks.append([i])
    while len(chunks) < count:
        cost = [chunk_cost([lengths[j] for j in c], packed=packed, multiple=multiple)
                if len(c) > 1 else -1 for c in chunks]
        at = cost.index(max(cost))
        half = len(chunks[at]) // 2
        chunks[at:at + 1] = [chunks[at][:half], chunks[at][half:]]
    return chunks
