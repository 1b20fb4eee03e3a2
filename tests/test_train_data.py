"""Training-batch assembly: fixed negatives per query, micro-batch layout."""
import pytest

from megaemb.data.formats import Example
from megaemb.data.batching import make_micro_batch
from megaemb.data.negatives import fixed_negatives
from megaemb.data.tokenize import TokenizedExample


def _ex(i, negs):
    return Example(query=f"q{i}", response=f"r{i}", negatives=negs, label=None, source=f"f:{i}")


@pytest.mark.timeout(30)
def test_fixed_negatives_cut_top_up_and_fill():
    examples = [_ex(0, ["a", "b", "c", "d"]), _ex(1, ["x"]), _ex(2, [])]
    negs, topped = fixed_negatives(examples, 3, seed=0)
    assert negs[0] == ["a", "b", "c"]
    assert negs[1] == ["x", "x", "x"]  # own negatives drawn again
    assert len(negs[2]) == 3 and set(negs[2]) <= {"r0", "r1"}  # other rows' positives, never r2
    assert topped == 2
    assert fixed_negatives(examples, 3, seed=0) == (negs, topped)  # seeded


@pytest.mark.timeout(30)
def test_single_row_without_negatives_is_an_error():
    with pytest.raises(ValueError, match="f:0: no hard negatives"):
        fixed_negatives([_ex(0, [])], 1, seed=0)


@pytest.mark.timeout(30)
def test_micro_batch_layout_queries_docs_negatives():
    rows = [TokenizedExample([1], [2, 3], [[4], [5, 6, 7]], None),
            TokenizedExample([8, 9], [10], [[11], [12]], None)]
    b = make_micro_batch(rows, pad_id=0, pad_multiple=2)
    assert b["m"] == 2 and b["k"] == 2 and b["labels"] is None
    assert b["lengths"].tolist() == [1, 2, 2, 1, 1, 3, 1, 1]
    assert b["ids"].shape == (8, 4)  # longest 3, rounded up to a multiple of 2
    assert b["ids"][5].tolist() == [5, 6, 7, 0]
