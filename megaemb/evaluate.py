"""Retrieval metrics (recall@k, nDCG@k, MRR@k), pair metrics (Spearman, Pearson) and a
reranker's within-group metrics, on CPU.

Embeddings may be torch tensors (any dtype/device) or numpy arrays; they are converted to
fp32 on CPU and L2-normalised, so every score is a cosine similarity. Relevance is binary.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

MAX_SCORES = 1 << 25  # largest [queries, corpus] score block held at once (32M fp32 = 128 MiB)


def _unit_rows(x, name: str) -> torch.Tensor:
    """``[n, d]`` array or tensor → fp32 CPU tensor with L2-normalised rows."""
    t = torch.as_tensor(x).detach().to("cpu", torch.float32)
    if t.dim() != 2:
        raise ValueError(f"{name} must be [n, d], got shape {tuple(t.shape)}")
    return F.normalize(t, dim=-1)


def _check_relevant(relevant: Sequence[set[int]], num_queries: int, corpus_size: int):
    if len(relevant) != num_queries:
        raise ValueError(f"relevant has {len(relevant)} entries for {num_queries} queries")
    for i, docs in enumerate(relevant):
        if not docs:
            raise ValueError(f"query {i} has no relevant document")
        bad = [j for j in docs if not 0 <= j < corpus_size]
        if bad:
            raise ValueError(f"query {i}: relevant ids {bad} outside the corpus [0, {corpus_size})")


CORPUS_BLOCK = 1 << 16  # corpus rows scored at once: a 1M-document corpus is 16 blocks


def _scan(queries: torch.Tensor, corpus: torch.Tensor, relevant: Sequence[set[int]], top: int,
          max_scores: int) -> tuple[torch.Tensor, float, float]:
    """One pass over the scores in ``[query chunk, corpus block]`` tiles of at most
    ``max_scores`` (a running top-``top`` merges the blocks): corpus ids ``[nq, top]`` by
    descending cosine (ties in arbitrary order), the sum of the relevant pairs' cosines and
    the sum of all cosines."""
    block = min(corpus.shape[0], max(top, CORPUS_BLOCK))
    chunk = max(1, max_scores // block)
    tops, total = [], 0.0
    for i in range(0, queries.shape[0], chunk):
        q = queries[i:i + chunk]
        best_v = best_i = None
        for j in range(0, corpus.shape[0], block):
            scores = q @ corpus[j:j + block].T
            total += scores.sum().item()
            v, idx = torch.topk(scores, min(top, scores.shape[1]), dim=1)
            if best_v is not None:
                v, idx = torch.cat([best_v, v], 1), torch.cat([best_i, idx + j], 1)
                v, pick = torch.topk(v, top, dim=1)
                idx = idx.gather(1, pick)
            best_v, best_i = v, idx
        tops.append(best_i)
    pos = sum((queries[r] @ corpus[sorted(rel)].T).sum().item() for r, rel in enumerate(relevant))
    return torch.cat(tops), pos, total


def search(query_emb, corpus_emb, k: int, max_scores: int = MAX_SCORES) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` by cosine: (corpus ids ``[nq, k]``, their cosines ``[nq, k]``), best
    first, tiled as :func:`retrieval_metrics` is (bounded memory for any corpus size)."""
    queries, corpus = _unit_rows(query_emb, "query_emb"), _unit_rows(corpus_emb, "corpus_emb")
    k = min(k, corpus.shape[0])
    ids, _, _ = _scan(queries, corpus, [set()] * queries.shape[0], k, max_scores)
    scores = (queries.unsqueeze(1) * corpus[ids]).sum(-1)
    return ids.numpy(), scores.numpy()


def retrieval_metrics(query_emb, corpus_emb, relevant: Sequence[set[int]],
                      ks: Sequence[int] = (1, 10), mrr_k: int | None = None,
                      map_k: int | None = None,
                      max_scores: int = MAX_SCORES) -> dict[str, float]:
    """Mean over queries of recall@k and nDCG@k for each ``k`` in ``ks``, MRR@``mrr_k``
    (default max(ks)) and, with ``map_k``, MAP@``map_k``.

    query_emb ``[nq, d]``, corpus_emb ``[nc, d]``; ``relevant[i]`` is the non-empty set of
    corpus ids relevant to query ``i``. Definitions (binary relevance, rank from 1):
    recall@k = |relevant ∩ top k| / |relevant| (BEIR/MTEB; the hit rate when one doc is
    relevant); nDCG@k = sum over relevant hits in the top k of 1/log2(rank+1), divided by its
    ideal value sum_{r=1..min(|relevant|, k)} 1/log2(r+1); MRR@K = 1/rank of the first
    relevant doc within the top K, else 0; AP@K = sum over relevant hits at rank i <= K of
    (hits in the top i) / i, divided by |relevant| (pytrec_eval's map_cut, as BEIR reports).
    Keys: ``recall@k``, ``ndcg@k``, ``mrr@K``, ``map@K``; ``mean_pos_sim`` / ``mean_neg_sim``:
    mean cosine of relevant / all other (query, corpus) pairs. Scores are computed in tiles
    of at most ``max_scores``.
    """
    queries, corpus = _unit_rows(query_emb, "query_emb"), _unit_rows(corpus_emb, "corpus_emb")
    _check_relevant(relevant, queries.shape[0], corpus.shape[0])
    ks = sorted(set(ks))
    mrr_k = mrr_k or ks[-1]
    top = min(max(ks[-1], mrr_k, map_k or 0), corpus.shape[0])
    ranked, pos_sum, all_sum = _scan(queries, corpus, relevant, top, max_scores)
    out = ranking_metrics(ranked.numpy(), relevant, corpus.shape[0], ks, mrr_k, map_k)
    num_pos, num_pairs = sum(map(len, relevant)), queries.shape[0] * corpus.shape[0]
    out["mean_pos_sim"] = pos_sum / num_pos
    out["mean_neg_sim"] = (all_sum - pos_sum) / (num_pairs - num_pos) if num_pairs > num_pos else float("nan")
    return out


def ranking_metrics(ranked: np.ndarray, relevant: Sequence[set[int]], corpus_size: int,
                    ks: Sequence[int] = (1, 10), mrr_k: int | None = None,
                    map_k: int | None = None) -> dict[str, float]:
    """:func:`retrieval_metrics` of given rankings: ``ranked [nq, top]`` corpus ids, best
    first (a retriever's top-``top``, or those reranked). A relevant document outside a
    query's list is a miss: it adds nothing, and the ideal DCG still counts it (up to
    ``min(k, corpus_size)`` ranks), so a list without a query's positive scores 0 for it."""
    _check_relevant(relevant, len(ranked), corpus_size)
    ks = sorted(set(ks))
    mrr_k = mrr_k or ks[-1]
    width = max(ks[-1], mrr_k, map_k or 0)
    hits = np.zeros((len(ranked), width))  # [nq, width]: ranks past the list are misses
    for i, (row, rel) in enumerate(zip(np.asarray(ranked).tolist(), relevant)):
        hits[i, :min(len(row), width)] = [doc in rel for doc in row[:width]]
    num_relevant = np.array([len(rel) for rel in relevant], dtype=np.float64)
    ideal = np.cumsum(1.0 / np.log2(np.arange(2, width + 2)))  # ideal DCG with r relevant: [r-1]
    discounted = hits / np.log2(np.arange(2, width + 2))
    out = {}
    for k in ks:
        out[f"recall@{k}"] = float(np.mean(hits[:, :k].sum(1) / num_relevant))
        best = ideal[np.minimum(num_relevant, min(k, corpus_size)).astype(int) - 1]
        out[f"ndcg@{k}"] = float(np.mean(discounted[:, :k].sum(1) / best))
    within = hits[:, :mrr_k]
    first = np.where(within.any(1), 1.0 / (within.argmax(1) + 1), 0.0)
    out[f"mrr@{mrr_k}"] = float(np.mean(first))
    if map_k:
        cut = hits[:, :map_k]
        precision = np.cumsum(cut, 1) / np.arange(1, cut.shape[1] + 1)
        out[f"map@{map_k}"] = float(np.mean((precision * cut).sum(1) / num_relevant))
    return out


def rerank(ranked: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """``ranked [nq, k]`` corpus ids reordered by ``scores [nq, k]`` (a reranker's, of each
    query's candidates), best first; equal scores keep the first stage's order."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), axis=1, kind="stable")
    return np.take_along_axis(np.asarray(ranked), order, 1)


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks from 1 of ``x [n]``; tied values all get the mean of their ranks."""
    order = np.argsort(x, kind="stable")
    ordered = x[order]
    starts_group = np.r_[True, ordered[1:] != ordered[:-1]]
    starts = np.flatnonzero(starts_group)
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x))
    ranks[order] = ((starts + ends + 1) / 2)[np.cumsum(starts_group) - 1]
    return ranks


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of ``x, y [n]``; NaN when either is constant."""
    x, y = x - x.mean(), y - y.mean()
    norm = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / norm) if norm > 0 else float("nan")


def pair_metrics(query_emb, doc_emb, labels, threshold: float = 0.5) -> dict[str, float]:
    """Metrics of the cosine of each pair ``(query_emb[i], doc_emb[i])``, both ``[n, d]``,
    against ``labels [n]`` (STS scores or 0/1).

    ``spearman`` / ``pearson``: rank (average ranks for ties) / linear correlation of cosine
    and label, NaN if either is constant. ``mean_pos`` / ``mean_neg``: mean cosine of pairs
    with label ``>= threshold`` / ``< threshold``, NaN if there are none.
    """
    queries, docs = _unit_rows(query_emb, "query_emb"), _unit_rows(doc_emb, "doc_emb")
    labels = torch.as_tensor(labels).detach().to("cpu", torch.float64).numpy().reshape(-1)
    if not queries.shape[0] == docs.shape[0] == labels.shape[0]:
        raise ValueError(f"query_emb, doc_emb and labels disagree on the number of pairs: "
                         f"{queries.shape[0]}, {docs.shape[0]}, {labels.shape[0]}")
    cosine = (queries * docs).sum(-1).double().numpy()
    positive = labels >= threshold
    return {
        "spearman": _pearson(_average_ranks(cosine), _average_ranks(labels)),
        "pearson": _pearson(cosine, labels),
        "mean_pos": float(cosine[positive].mean()) if positive.any() else float("nan"),
        "mean_neg": float(cosine[~positive].mean()) if (~positive).any() else float("nan"),
    }


def rerank_metrics(scores: Sequence[np.ndarray], labels: Sequence[np.ndarray],
                   k: int = 10) -> dict[str, float]:
    """A reranker's within-group metrics (a sanity check, not retrieval quality): each group's
    candidates ranked by ``scores`` (``l_yes - l_no``), ``labels`` 1 / 0 (binary relevance).
    ``mrr@k`` and ``ndcg@k`` as :func:`retrieval_metrics` defines them, over the groups with a
    positive; ``accuracy``: share of all candidates whose P(yes) = sigmoid(score) > 0.5 agrees
    with their label."""
    mrr, ndcg, right, total = [], [], 0, 0
    for s, y in zip(scores, labels):
        s, y = np.asarray(s, dtype=np.float64), np.asarray(y) > 0.5
        right += int(((s > 0) == y).sum())
        total += len(y)
        if not y.any():
            continue
        hits = y[np.argsort(-s, kind="stable")][:k]
        first = np.flatnonzero(hits)
        mrr.append(1.0 / (first[0] + 1) if len(first) else 0.0)
        discounts = 1.0 / np.log2(np.arange(2, len(hits) + 2))
        ndcg.append(float((hits * discounts).sum() / discounts[:min(int(y.sum()), k)].sum()))
    return {f"mrr@{k}": float(np.mean(mrr)) if mrr else 0.0,
            f"ndcg@{k}": float(np.mean(ndcg)) if ndcg else 0.0,
            "accuracy": right / max(total, 1)}
