"""megaemb.data.sampler: deterministic, layout-independent, resumable global batches."""
from __future__ import annotations

from collections import Counter

import pytest

from megaemb.data.sampler import GlobalBatchSampler, micro_batches, shard_for_rank


def stream(sampler: GlobalBatchSampler, steps: int) -> list[int]:
    return [i for step in range(steps) for i in sampler.indices_for_step(step)]


@pytest.mark.timeout(60)
def test_deterministic_and_seed_dependent():
    a = GlobalBatchSampler(100, 8, seed=3)
    b = GlobalBatchSampler(100, 8, seed=3)
    c = GlobalBatchSampler(100, 8, seed=4)
    assert stream(a, 30) == stream(b, 30)
    assert stream(a, 30) != stream(c, 30)
    assert all(isinstance(i, int) for i in a.indices_for_step(0))


@pytest.mark.timeout(60)
def test_one_epoch_is_a_permutation():
    sampler = GlobalBatchSampler(96, 8, seed=0)
    assert sampler.steps_per_epoch == 12
    epoch0 = stream(sampler, 12)
    assert sorted(epoch0) == list(range(96))
    assert epoch0 != list(range(96))
    epoch1 = [i for step in range(12, 24) for i in sampler.indices_for_step(step)]
    assert sorted(epoch1) == list(range(96)) and epoch1 != epoch0


@pytest.mark.timeout(60)
def test_batches_straddle_epochs_without_dropping():
    sampler = GlobalBatchSampler(10, 4, seed=1)
    assert sampler.steps_per_epoch == 3  # ceil(10 / 4)
    flat = stream(sampler, 10)  # 40 entries = 4 full epochs
    for epoch in range(4):
        assert sorted(flat[epoch * 10:(epoch + 1) * 10]) == list(range(10))
    assert [sampler.epoch_of_step(s) for s in range(6)] == [0, 0, 0, 1, 1, 2]


@pytest.mark.timeout(60)
def test_global_batch_larger_than_data():
    sampler = GlobalBatchSampler(3, 8, seed=0)
    batch = sampler.indices_for_step(0)
    assert len(batch) == 8
    assert sorted(batch[:3]) == sorted(batch[3:6]) == [0, 1, 2]
    assert Counter(stream(sampler, 3)) == {0: 8, 1: 8, 2: 8}
    assert sampler.steps_per_epoch == 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dp_size, micro_batch_size", [(1, 1), (1, 12), (2, 3), (3, 2), (4, 3), (12, 1)])
def test_layouts_see_the_same_global_batch(dp_size, micro_batch_size):
    sampler = GlobalBatchSampler(50, 12, seed=7)
    for step in range(10):
        batch = sampler.indices_for_step(step)
        seen = [i for rank in range(dp_size)
                for micro in micro_batches(shard_for_rank(batch, rank, dp_size), micro_batch_size)
                for i in micro]
        assert seen == batch
        assert batch == GlobalBatchSampler(50, 12, seed=7).indices_for_step(step)


@pytest.mark.timeout(60)
def test_resume_is_exact():
    full = GlobalBatchSampler(37, 6, seed=5)
    expected = [full.indices_for_step(s) for s in range(40)]
    resumed = GlobalBatchSampler(37, 6, seed=5)
    assert [resumed.indices_for_step(s) for s in range(23, 40)] == expected[23:]
    assert resumed.indices_for_step(2) == expected[2]  # going back also works


@pytest.mark.timeout(60)
def test_iterations_for_epochs():
    sampler = GlobalBatchSampler(30, 4, seed=0)
    assert sampler.iterations_for_epochs(1) == 8  # ceil(30 / 4)
    assert sampler.iterations_for_epochs(2) == 15
    assert sampler.iterations_for_epochs(0.1) == 1  # 3 examples
    assert GlobalBatchSampler(30, 3, seed=0).iterations_for_epochs(0.1) == 1  # exact, no float drift
    assert GlobalBatchSampler(20000, 64, seed=0).iterations_for_epochs(3) == 938
    with pytest.raises(ValueError, match="num_train_epochs must be > 0"):
        sampler.iterations_for_epochs(0)


@pytest.mark.timeout(60)
def test_shard_for_rank_is_contiguous_and_equal():
    batch = list(range(100, 112))
    assert [shard_for_rank(batch, r, 3) for r in range(3)] == [
        [100, 101, 102, 103], [104, 105, 106, 107], [108, 109, 110, 111]]


@pytest.mark.timeout(60)
def test_micro_batches_split_in_order():
    assert micro_batches([5, 6, 7, 8, 9, 10], 2) == [[5, 6], [7, 8], [9, 10]]


@pytest.mark.timeout(60)
def test_errors_are_clear():
    with pytest.raises(ValueError, match="global batch size 12 is not divisible by the "
                                         "data-parallel size 5"):
        shard_for_rank(list(range(12)), 0, 5)
    with pytest.raises(ValueError, match=r"dp_rank must be in \[0, 2\), got 2"):
        shard_for_rank(list(range(12)), 2, 2)
    with pytest.raises(ValueError, match="per-rank batch size 6 is not divisible by "
                                         "micro_batch_size 4"):
        micro_batches(list(range(6)), 4)
    with pytest.raises(ValueError, match="micro_batch_size must be >= 1"):
        micro_batches(list(range(6)), 0)
    with pytest.raises(ValueError, match="num_examples must be >= 1"):
        GlobalBatchSampler(0, 4, seed=0)
    with pytest.raises(ValueError, match="global_batch_size must be >= 1"):
        GlobalBatchSampler(4, 0, seed=0)
    with pytest.raises(ValueError, match="step must be >= 0"):
        GlobalBatchSampler(4, 2, seed=0).indices_for_step(-1)
