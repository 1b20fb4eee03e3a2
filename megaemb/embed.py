"""``megaemb embed``: texts -> ``.npy`` of L2-normalised embeddings ``[n, dim]`` (float32).

Rows are split over data-parallel replicas (every replica runs the same number of forward
steps), sorted by length inside each replica (less padding, or packs of similar texts), cut
into padded or packed micro-batches (``packed``; default: ``model.packs_by_default``),
and gathered back in input order with a tensor collective; global rank 0 writes the file.
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megaemb import platform
from megaemb.data.formats import FILE_TYPES, BadRow, DataError, file_rows, row_text, supported
from megaemb.data.tokenize import EmbeddingTokenizer, format_query
from megaemb.inference import forward_embeddings


def read_texts(path: str, text_field: str = "text") -> list[str]:
    """``.txt``: one text per line (blank lines are errors); any file or folder ``sft
    --dataset`` reads (``data.formats.file_rows``: JSONL, JSON arrays, CSV, Parquet, datasets
    folders): field ``text_field`` of every row. Anything else, a bad row (``file:line``) or
    no text raises ``DataError``."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such input file")
    texts = _lines(path) if path.endswith(".txt") else _field_texts(path, text_field)
    if not texts:
        raise DataError(f"{path}: no texts")
    return texts


def _lines(path: str) -> list[str]:
    """Every line of a text file, each one text."""
    texts = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                raise DataError(f"{path}:{lineno}: empty line (every line is one text)")
            texts.append(line)
    return texts


def _field_texts(path: str, name: str) -> list[str]:
    """Field ``name`` of every row of a dataset file or folder, in order."""
    texts = []
    for where, row in file_rows(path):
        try:
            if isinstance(row, BadRow):
                raise row
            texts.append(row_text(row, name))
        except BadRow as bad:
            raise DataError(f"{path}{where}: {bad.detail}", bad.reason) from None
    return texts


def check_input(path: str) -> None:
    """``--input``: an existing ``.txt`` or a file type ``read_texts`` reads (before any load)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"--input {path}: no such file or directory")
    if not (path.endswith(".txt") or supported(path)):
        raise ValueError(f"--input {path}: unsupported file type; expected .txt (a text per line), "
                         f"{FILE_TYPES}")


def embed_texts(model, tokenizer: EmbeddingTokenizer, texts: list[str], *, batch_size: int = 32,
                instruction: str | None = None, dim: int | None = None,
                packed: bool | None = None) -> np.ndarray | None:
    """Collective. Returns ``[n, dim]`` on global rank 0, None elsewhere (``forward_split``
    of the texts' token ids)."""
    return forward_split(model, len(texts),
                         lambda mine: tokenizer.encode([format_query(texts[i], instruction) for i in mine]),
                         pad_id=tokenizer.pad_id, batch_size=batch_size, dim=dim, packed=packed)


def forward_split(model, n: int, encode, *, pad_id: int, batch_size: int = 32,
                  dim: int | None = None, packed: bool | None = None) -> np.ndarray | None:
    """Collective: the model's outputs for ``n`` inputs, ``encode(indices)`` giving the token-id
    lists of those inputs. Returns ``[n, dim or h]`` embeddings (a model with a scoring head:
    scores ``[n]``) on global rank 0, None elsewhere.

    Data-parallel rank ``r`` runs inputs ``r, r + dp, ...``, padded with one-token dummy rows
    to ``ceil(n / dp)``, so every rank runs the same number of forward steps (an MoE layer's
    all-to-all spans data-parallel ranks: unequal step counts would deadlock). The
    ``[dp * ceil(n / dp), ...]`` result is gathered with one tensor collective.
    """
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    per_rank = -(-n // dp)
    seqs = encode(list(range(dp_rank, n, dp)))
    seqs += [[pad_id]] * (per_rank - len(seqs))
    order = sorted(range(per_rank), key=lambda i: len(seqs[i]))
    packed = model.packs_by_default if packed is None else packed
    out = torch.empty(model.output_shape(per_rank, dim), device=platform.device())
    out[order] = forward_embeddings(model, [seqs[i] for i in order], pad_id=pad_id,
                                    packed=packed, micro_batch_size=batch_size, dim=dim)
    gathered = out.new_empty(dp * per_rank, *out.shape[1:])
    dist.all_gather_into_tensor(gathered, out, group=parallel_state.get_data_parallel_group())
    if dist.get_rank() != 0:
        return None
    # gathered row r * per_rank + j holds input r + j * dp
    by_input = gathered.view(dp, per_rank, *out.shape[1:]).transpose(0, 1).reshape(dp * per_rank, *out.shape[1:])
    return by_input[:n].cpu().numpy()
