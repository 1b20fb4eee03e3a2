"""Which examples each global step trains on: deterministic and layout-independent.

The example stream is an endless concatenation of epochs; epoch ``e`` is the seeded
permutation ``numpy.random.default_rng([seed, e]).permutation(num_examples)``. Global step
``k`` takes entries ``[k * global_batch_size, (k + 1) * global_batch_size)`` of that stream,
so a batch may straddle two epochs and no example is dropped at an epoch's end. Such a
batch may hold an example twice; the loss never scores a copy of a query's own texts as its
negative (``loss.info_nce``'s keys), and training refuses a global batch larger than the
examples (``SFTConfig.check_examples``).

The indices of a step depend only on (num_examples, global_batch_size, seed, step): never on
the data-parallel size, the micro batch size or any earlier step. The sampler is stateless,
so resuming at step ``k`` is exactly ``indices_for_step(k)``; nothing needs checkpointing.

One step on one rank:

    batch = sampler.indices_for_step(step)              # global_batch_size indices
    shard = shard_for_rank(batch, dp_rank, dp_size)     # this rank's contiguous slice
    for micro in micro_batches(shard, micro_batch_size):
        ...

so concatenating the shards of ranks 0..dp_size-1 gives back the global batch.
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np


class GlobalBatchSampler:
    """Example indices of each global step of ``global_batch_size`` examples."""

    def __init__(self, num_examples: int, global_batch_size: int, seed: int):
        if num_examples < 1:
            raise ValueError(f"num_examples must be >= 1, got {num_examples}")
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
        self.num_examples = num_examples
        self.global_batch_size = global_batch_size
        self.seed = seed
        self._cache: dict[int, np.ndarray] = {}  # the two most recent epochs

    @property
    def steps_per_epoch(self) -> int:
        """``ceil(num_examples / global_batch_size)``: after this many steps every example
        of epoch 0 has been seen (the last step may reach into epoch 1)."""
        return -(-self.num_examples // self.global_batch_size)

    def iterations_for_epochs(self, num_train_epochs: float) -> int:
        """``--num_train_epochs`` -> ``--train_iters``:
        ``ceil(num_train_epochs * num_examples / global_batch_size)``."""
        if num_train_epochs <= 0:
            raise ValueError(f"num_train_epochs must be > 0, got {num_train_epochs}")
        return math.ceil(Fraction(str(num_train_epochs)) * self.num_examples
                         / self.global_batch_size)

    def epoch_of_step(self, step: int) -> int:
        """The epoch of the step's first example."""
        self._check_step(step)
        return step * self.global_batch_size // self.num_examples

    def indices_for_step(self, step: int) -> list[int]:
        """The ``global_batch_size`` example indices of global step ``step`` (0-based)."""
        self._check_step(step)
        start = step * self.global_batch_size
        stop = start + self.global_batch_size
        out: list[int] = []
        while start < stop:
            epoch, offset = divmod(start, self.num_examples)
            take = min(stop - start, self.num_examples - offset)
            out.extend(self._permutation(epoch)[offset:offset + take].tolist())
            start += take
        return out

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            if len(self._cache) >= 2:
                del self._cache[min(self._cache)]
            rng = np.random.default_rng([self.seed, epoch])
            self._cache[epoch] = rng.permutation(self.num_examples)
        return self._cache[epoch]

    @staticmethod
    def _check_step(step: int) -> None:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")


def shard_for_rank(indices: list[int], dp_rank: int, dp_size: int) -> list[int]:
    """Data-parallel rank ``dp_rank``'s contiguous, equal slice of a global batch."""
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank must be in [0, {dp_size}), got {dp_rank}")
    if len(indices) % dp_size:
        raise ValueError(f"global batch size {len(indices)} is not divisible by the "
                         f"data-parallel size {dp_size}")
    size = len(indices) // dp_size
    return indices[dp_rank * size:(dp_rank + 1) * size]


def micro_batches(indices: list[int], micro_batch_size: int) -> list[list[int]]:
    """Split one rank's shard into consecutive micro batches of ``micro_batch_size``."""
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if len(indices) % micro_batch_size:
        raise ValueError(f"per-rank batch size {len(indices)} is not divisible by "
                         f"micro_batch_size {micro_batch_size}")
    return [indices[i:i + micro_batch_size] for i in range(0, len(indices), micro_batch_size)]
