"""Hard negatives for InfoNCE: exactly ``k`` per example, as ms-swift builds them."""
from __future__ import annotations

import random
from typing import Callable

import numpy as np


def negative_picks(counts: np.ndarray, k: int, seed: int,
                   source: Callable[[int], str]) -> tuple[np.ndarray, int]:
    """Which ``k`` texts are example ``i``'s hard negatives (the loss needs ``[b, k, d]``),
    as ms-swift: its first ``k`` when it has more; an example with fewer is topped up by
    drawing its own negatives again (seeded, with replacement), and one with none by drawing
    other examples' positives.

    ``counts``: int [n], the negatives each example has. Returns ``picks`` int64 [n, k]
    (``p >= 0``: the example's own negative ``p``; ``p < 0``: the positive of example
    ``-1 - p``) and how many examples were topped up. ``source(i)`` names example ``i`` in
    the error raised when it has no negatives and there is no other example."""
    n = len(counts)
    counts = np.asarray(counts, np.int64)
    picks = np.broadcast_to(np.arange(k, dtype=np.int64), (n, k)).copy()
    short = np.flatnonzero(counts < k)
    rng = random.Random(seed)
    for i in short.tolist():  # in example order: the draws are one seeded sequence
        c = int(counts[i])
        if not c and n < 2:
            raise ValueError(f"{source(i)}: no hard negatives and no other rows to draw from")
        for m in range(c, k):
            if c:
                picks[i, m] = rng.randrange(c)
            else:
                j = rng.randrange(n - 1)
                picks[i, m] = -1 - (j + (j >= i))  # any example but i
    return picks, len(short)
