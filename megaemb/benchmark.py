"""``megaemb eval``: a model's retrieval or STS quality on a local dataset.

Collective over every rank (encoding runs through the parallel model, ``embed.embed_texts``,
padded or packed); global rank 0 computes the metrics (``evaluate``), prints the table and
writes ``--output``. Corpus embeddings are cached by content (``EmbeddingCache``): the same
model files, texts, ``--max_length`` and dimension reuse ``<cache>/<hash>.npz`` (checked by
its CRC-32 on every read).

Retrieval: recall@1/5/10/100, nDCG@10, MRR@10, MAP@100 (``evaluate.retrieval_metrics``);
pairs: Spearman and Pearson of cosine vs label. With several ``--mrl_dims`` one row per
dimension (embeddings truncated to d and renormalised) and a PNG of quality vs dimension.

Reranking (``--retriever``): the retriever's top-k per query, reordered by the reranker's
scores; the same metrics of both rankings (``rerank_results``), a positive outside the
top-k counted as a miss.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import torch.distributed as dist

from megaemb import checkpoint
from megaemb.outputs import atomic_file
from megaemb.data.eval_sets import PairSet, has_float_labels, is_beir, read_beir, read_infonce, read_pairs
from megaemb.data.formats import parse_spec
from megaemb.evaluate import pair_metrics, ranking_metrics, rerank, retrieval_metrics

RETRIEVAL_KS = (1, 5, 10, 100)
COLUMNS = {"retrieval": ("recall@1", "recall@5", "recall@10", "recall@100", "ndcg@10", "mrr@10", "map@100"),
           "pairs": ("spearman", "pearson")}


def read_eval_set(specs: list[str]):
    """A BEIR folder, labelled pairs, or infonce rows -> ``RetrievalSet`` / ``PairSet``."""
    if len(specs) == 1 and is_beir(specs[0]):
        return read_beir(specs[0])
    first = parse_spec(specs[0])[0]
    if os.path.exists(first) and has_float_labels(first):
        return read_pairs(specs)
    return read_infonce(specs)


def _files_fingerprint(path: str) -> list:
    """(name, size, mtime) of the files that hold a model's weights: an HF directory's, or a
    megaemb checkpoint's latest iteration (and, for LoRA, its base's)."""
    if checkpoint.is_checkpoint(path):
        it = checkpoint.iter_dir(path, checkpoint.latest_iteration(path))
        files = [os.path.join(it, n) for n in sorted(os.listdir(it))]
        lora = checkpoint.read_lora(path)
        base = _files_fingerprint(lora["base"]) if lora else []
    else:
        files = [os.path.join(path, n) for n in sorted(os.listdir(path))
                 if n.endswith((".safetensors", ".json"))]
        base = []
    return [(os.path.basename(f), os.path.getsize(f), os.stat(f).st_mtime_ns)
            for f in files if os.path.isfile(f)] + base


class EmbeddingCache:
    """``<dir>/<sha256>.npz`` per (model files, texts, max_length, instruction, dim); rank 0
    reads and writes (atomically), every rank learns whether it hit.

    An entry is an uncompressed ``.npz`` (one array, ``emb``): the zip format stores a CRC-32
    of the array that is checked on every read, so a flipped, truncated or foreign entry is
    found at the cost of one CRC-32 pass (about 4 GB/s, against minutes of encoding), noted
    in one line naming it, and encoded again. A cache that cannot be written costs only the
    reuse: the embeddings are still returned, with a note."""

    def __init__(self, directory: str, model_path: str, max_length: int):
        self.dir = directory
        self.model = [os.path.realpath(model_path), _files_fingerprint(model_path), max_length]

    def path(self, texts: list[str], instruction: str | None, dim: int | None) -> str:
        h = hashlib.sha256(json.dumps([self.model, instruction, dim]).encode())
        for t in texts:
            h.update(t.encode())
            h.update(b"\0")
        return os.path.join(self.dir, h.hexdigest()[:32] + ".npz")

    def embed(self, encode, texts: list[str], instruction: str | None = None,
              dim: int | None = None) -> tuple[np.ndarray | None, bool]:
        """``encode(texts, instruction)`` (collective) unless cached; (rank 0's array, hit)."""
        path = self.path(texts, instruction, dim)
        cached = _read_entry(path, len(texts)) if dist.get_rank() == 0 else None
        hit = [cached is not None]
        dist.broadcast_object_list(hit, src=0)
        if hit[0]:
            return cached, True
        out = encode(texts, instruction)
        if dist.get_rank() == 0:
            _write_entry(path, out)
        return out, False


def _read_entry(path: str, rows: int) -> np.ndarray | None:
    """The cached ``[rows, d]`` array at ``path``; None when there is none, or (with a note)
    when it is damaged: a CRC-32 mismatch, a truncated or foreign file, another row count."""
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path) as entry:
            emb = entry["emb"]
        if emb.ndim != 2 or emb.shape[0] != rows:
            raise ValueError(f"shape {emb.shape}, expected {rows} rows")
        return emb
    except Exception as e:  # zipfile, numpy and pickle errors of a damaged file vary
        print(f"note: embedding cache entry {path} is damaged ({type(e).__name__}: {e}); "
              "encoding again", flush=True)
        return None


def _write_entry(path: str, emb: np.ndarray) -> None:
    """Write ``emb`` to ``path`` atomically (a per-process temp name: the cache is shared); a
    note, not an error, when the cache is not writable."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with atomic_file(path, "wb") as f:  # a file object: np.savez would append .npz to a name
            np.savez(f, emb=emb)
    except OSError as e:
        print(f"note: cannot write the embedding cache {path} ({e.strerror or e}); "
              "the embeddings are used but not kept", flush=True)


def truncate(emb: np.ndarray, dim: int | None) -> np.ndarray:
    """Matryoshka: the first ``dim`` coordinates, renormalised."""
    if dim is None or dim >= emb.shape[1]:
        return emb
    cut = emb[:, :dim]
    return cut / np.maximum(np.linalg.norm(cut, axis=1, keepdims=True), 1e-12)


def evaluate_set(data, queries: np.ndarray, docs: np.ndarray, dims: list[int | None]) -> dict:
    """Rank 0: {dim: metrics} (dim None = the full width)."""
    out = {}
    for d in dims:
        q, c = truncate(queries, d), truncate(docs, d)
        if isinstance(data, PairSet):
            out[d] = pair_metrics(q, c, data.labels)
        else:
            out[d] = retrieval_metrics(q, c, data.relevant, ks=RETRIEVAL_KS, mrr_k=10, map_k=100)
    return out


def rerank_columns(top_k: int) -> tuple[str, ...]:
    """``eval --retriever``'s metrics: recall at 1, 5, 10 and ``top_k``, nDCG@10, MRR@10, MAP@``top_k``."""
    return (*(f"recall@{k}" for k in sorted({1, 5, 10, top_k})), "ndcg@10", "mrr@10", f"map@{top_k}")


def rerank_results(relevant: list[set[int]], corpus_size: int, ranked: np.ndarray,
                   scores: np.ndarray) -> dict:
    """Rank 0: ``{"retriever": metrics, "reranked": metrics}`` of the retriever's top-k
    (``ranked [nq, k]`` corpus ids, best first) and of the same ids reordered by the
    reranker's ``scores [nq, k]``; a relevant document outside a query's top-k is a miss in
    both (``evaluate.ranking_metrics``), so recall@k is the same in both blocks."""
    k = ranked.shape[1]
    ks = sorted({1, 5, 10, k})
    return {name: ranking_metrics(ids, relevant, corpus_size, ks=ks, mrr_k=10, map_k=k)
            for name, ids in (("retriever", ranked), ("reranked", rerank(ranked, scores)))}


def table(kind: str, results: dict, width: int) -> str:
    """The metrics, one row per dimension (``rerank``: per ranking, ``width`` being top-k);
    a NaN is explained below the table."""
    cols = rerank_columns(width) if kind == "rerank" else COLUMNS[kind]
    lines = [("ranking" if kind == "rerank" else "dim").ljust(10) + "".join(f"{c:>11}" for c in cols)]
    for d, m in results.items():
        lines.append(f"{d or width:<10}" + "".join(f"{m[c]:>11.4f}" for c in cols))
    if any(m[c] != m[c] for m in results.values() for c in cols):  # labels vary (read_pairs)
        lines.append("nan: the model gives every pair the same cosine, so it has no correlation "
                     "with the labels")
    return "\n".join(lines)


def flat(kind: str, results: dict, width: int) -> dict:
    """The last (largest) dimension's row as flat keys (``recall@10``, ...); every other
    dimension's as ``<key>@dim<d>``."""
    rows = list(results.items())
    main_dim, main = rows[-1]
    out = {"kind": kind, "dim": main_dim or width, **main}
    for d, m in rows[:-1]:
        out.update({f"{k}@dim{d}": v for k, v in m.items()})
    return out


def plot_dims(kind: str, results: dict, width: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = [d or width for d in results]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in (("ndcg@10", "recall@10", "mrr@10") if kind == "retrieval" else ("spearman", "pearson")):
        ax.plot(dims, [m[key] for m in results.values()], marker="o", label=key)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("embedding dimension (Matryoshka)")
    ax.set_ylabel("score")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
