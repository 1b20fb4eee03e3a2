"""Hard negatives for InfoNCE: exactly ``k`` per example, as ms-swift builds them."""
from __future__ import annotations

import random

from megaemb.data.formats import Example


def fixed_negatives(examples: list[Example], k: int, seed: int) -> tuple[list[list[str]], int]:
    """Exactly ``k`` hard negatives per example (the loss needs ``[b, k, d]``), as ms-swift:
    the first ``k`` when a row has more; a row with fewer is topped up by drawing its own
    negatives again (seeded, with replacement), and a row with none by drawing other rows'
    positives. Returns the lists and how many rows were topped up."""
    rng = random.Random(seed)

    def draw(i: int) -> str:
        if examples[i].negatives:
            return rng.choice(examples[i].negatives)
        if len(examples) < 2:
            raise ValueError(f"{examples[i].source}: no hard negatives and no other rows to draw from")
        j = rng.randrange(len(examples) - 1)
        return examples[j + (j >= i)].response  # any row but i

    out, topped = [], 0
    for i, e in enumerate(examples):
        negs = list(e.negatives[:k])
        topped += len(negs) < k
        out.append(negs + [draw(i) for _ in range(k - len(negs))])
    return out, topped
