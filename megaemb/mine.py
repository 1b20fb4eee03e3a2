"""``megaemb mine``: hard negatives for the next training round, from the dataset's own corpus.

The corpus is every distinct response and rejected response of the infonce rows. For each
row, the candidates are the corpus documents ranked ``lo+1 .. hi`` by cosine to the query
(``--range lo-hi``: skip the ``lo`` closest, which are often unlabelled positives), minus every
response of the same query (its positives) and minus anything scoring above ``margin`` x the
row's positive score (likely false negatives); the first ``num_negatives`` in rank order
become ``rejected_response``. Rows with fewer candidates keep fewer (training tops them up).
"""
from __future__ import annotations

import json

import numpy as np

from megaemb.evaluate import search
from megaemb.outputs import atomic_file


def parse_range(text: str) -> tuple[int, int]:
    """``"10-100"`` -> (10, 100): skip 10 ranks, look up to rank 100."""
    try:
        lo, hi = (int(x) for x in text.split("-"))
    except ValueError:
        raise ValueError(f"--range {text!r}: expected LO-HI, e.g. 10-100") from None
    if not 0 <= lo < hi:
        raise ValueError(f"--range {text!r}: need 0 <= LO < HI")
    return lo, hi


def mine_negatives(query_emb, corpus_emb, positive: list[int], positives: list[set[int]], *,
                   num_negatives: int, lo: int, hi: int, margin: float) -> list[list[int]]:
    """Row ``i``: query ``query_emb[i]``, its positive document ``positive[i]`` and the set
    ``positives[i]`` of every document relevant to its query; returns corpus ids of its hard
    negatives (see the module docstring). Embeddings ``[n, d]`` are L2-normalised here."""
    q = query_emb / np.linalg.norm(query_emb, axis=1, keepdims=True)
    c = corpus_emb / np.linalg.norm(corpus_emb, axis=1, keepdims=True)
    ids, scores = search(q, c, hi)
    pos_scores = (q * c[positive]).sum(1)
    out = []
    for i in range(len(positive)):
        limit = margin * pos_scores[i]
        picked = [int(j) for j, s in zip(ids[i, lo:], scores[i, lo:])
                  if j not in positives[i] and s <= limit]
        out.append(picked[:num_negatives])
    return out


def write_mined(path: str, rows: list[tuple[str, str]], corpus: list[str],
                negatives: list[list[int]]) -> None:
    """infonce JSONL (``query``, ``response``, ``rejected_response``), written atomically."""
    with atomic_file(path) as f:
        for (query, response), neg in zip(rows, negatives):
            f.write(json.dumps({"query": query, "response": response,
                                "rejected_response": [corpus[j] for j in neg]}, ensure_ascii=False) + "\n")
