"""Training-batch assembly: fixed negatives per query, micro-batch layout."""
import random

import pytest

from megaemb.data.batching import make_micro_batch
from megaemb.data.negatives import negative_picks
from megaemb.data.tokenize import TokenizedExample


@pytest.mark.timeout(30)
def test_negative_picks_cut_top_up_and_fill():
    picks, topped = negative_picks([4, 1, 0], 3, seed=0, source=str)
    assert picks[0].tolist() == [0, 1, 2]  # the first k
    assert picks[1].tolist() == [0, 0, 0]  # its one negative drawn again
    assert set(picks[2].tolist()) <= {-1, -2}  # other examples' positives (0, 1), never its own
    assert topped == 2
    again, _ = negative_picks([4, 1, 0], 3, seed=0, source=str)
    assert (again == picks).all()  # seeded
    # the draws follow ms-swift's random.Random(seed) sequence: choice() over own negatives,
    # randrange(n - 1) over the other rows
    rng = random.Random(5)
    own = [rng.randrange(2) for _ in range(3)]
    j = rng.randrange(2)
    picks, _ = negative_picks([2, 5, 0], 5, seed=5, source=str)
    assert picks[0].tolist() == [0, 1, *own] and picks[1].tolist() == [0, 1, 2, 3, 4]
    assert picks[2, 0] == -1 - (j + (j >= 2))


@pytest.mark.timeout(30)
def test_single_row_without_negatives_is_an_error():
    with pytest.raises(ValueError, match="f:0: no hard negatives"):
        negative_picks([0], 1, seed=0, source=lambda i: f"f:{i}")


@pytest.mark.timeout(30)
def test_micro_batch_layout_queries_docs_negatives():
    rows = [TokenizedExample([1], [2, 3], [[4], [5, 6, 7]], None),
            TokenizedExample([8, 9], [10], [[11], [12]], None)]
    b = make_micro_batch(rows, pad_id=0, multiple=2)
    assert b.m == 2 and b.k == 2 and b.labels is None
    assert b.texts.lengths.tolist() == [1, 2, 2, 1, 1, 3, 1, 1]
    assert b.texts.input_ids.shape == (8, 4)  # longest 3, rounded up to a multiple of 2
    assert b.texts.input_ids[5].tolist() == [5, 6, 7, 0]
    # row i's end token sits at position lengths[i] - 1 of row i: flat index pos * n + i
    assert b.texts.pool_index.tolist() == [0, 8 + 1, 8 + 2, 3, 4, 16 + 5, 6, 7]

    p = make_micro_batch(rows, pad_id=0, packed=True, multiple=3)
    t = p.texts
    assert t.input_ids.shape == (1, 66)  # 12 tokens -> bucket 64 -> multiple of 3
    assert t.input_ids[0, :12].tolist() == [1, 8, 9, 2, 3, 10, 4, 5, 6, 7, 11, 12]
    assert t.input_ids[0, 12:].eq(0).all()
    assert t.cu_seqlens.tolist() == [0, 1, 3, 5, 6, 7, 10, 11, 12, 66]  # last: the padding tail
    assert t.pool_index.tolist() == [0, 2, 4, 5, 6, 9, 10, 11]
    assert t.position_ids[0, :12].tolist() == [0, 0, 1, 0, 1, 0, 0, 0, 1, 2, 0, 0]
    assert t.position_ids[0, 12:15].tolist() == [0, 1, 2]
    assert t.max_seqlen == 64  # the longest document (54, the tail) rounded to its bucket


@pytest.mark.timeout(30)
def test_pack_lengths_are_few_buckets():
    from megaemb.data.batching import pack_length

    sizes = {pack_length(t) for t in range(1, 100_001)}
    assert min(sizes) == 64 and max(sizes) >= 100_000
    assert len(sizes) <= 4 * 12  # four per octave from 64 to 2^17
    assert all(pack_length(t) < 1.25 * t + 1 for t in range(64, 100_001))
    assert all(pack_length(t, 6) % 6 == 0 and pack_length(t, 6) >= t for t in range(1, 3000))
