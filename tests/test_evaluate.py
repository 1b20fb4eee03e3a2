"""megaemb.evaluate on hand-built cases with known answers."""
import math

import numpy as np
import pytest
import torch

from megaemb.evaluate import pair_metrics, retrieval_metrics

pytestmark = pytest.mark.timeout(120)


def _at_angles(*angles):
    """Unit vectors in 2-D at the given angles: cosine with [1, 0] falls as the angle grows."""
    a = torch.tensor(angles, dtype=torch.float64)
    return torch.stack([a.cos(), a.sin()], dim=1)


QUERY = _at_angles(0.0)
CORPUS = _at_angles(*[0.1 * i for i in range(15)])  # corpus id i is ranked i+1 for QUERY


def test_perfect_retrieval_scores_one():
    emb = torch.eye(6)
    got = retrieval_metrics(emb, emb, [{i} for i in range(6)])
    assert got == {"recall@1": 1.0, "ndcg@1": 1.0, "recall@10": 1.0, "ndcg@10": 1.0, "mrr@10": 1.0,
                   "mean_pos_sim": 1.0, "mean_neg_sim": 0.0}


def test_positive_at_rank_three():
    got = retrieval_metrics(QUERY, CORPUS, [{2}])
    assert got["recall@1"] == 0 and got["ndcg@1"] == 0 and got["recall@10"] == 1
    assert got["mrr@10"] == pytest.approx(1 / 3)
    assert got["ndcg@10"] == pytest.approx(1 / math.log2(4))  # 0.5


def test_two_relevant_documents():
    got = retrieval_metrics(QUERY, CORPUS, [{0, 3}])  # ranks 1 and 4
    assert got["recall@1"] == 0.5 and got["recall@10"] == 1 and got["mrr@10"] == 1
    assert got["ndcg@10"] == pytest.approx((1 + 1 / math.log2(5)) / (1 + 1 / math.log2(3)))


def test_relevant_outside_the_cutoff_scores_zero():
    got = retrieval_metrics(QUERY, CORPUS, [{11}])  # rank 12
    sims = {k: got.pop(k) for k in ("mean_pos_sim", "mean_neg_sim")}
    assert got == {"recall@1": 0.0, "ndcg@1": 0.0, "recall@10": 0.0, "ndcg@10": 0.0, "mrr@10": 0.0}
    others = [math.cos(0.1 * i) for i in range(15) if i != 11]
    assert sims["mean_pos_sim"] == pytest.approx(math.cos(1.1), abs=1e-6)
    assert sims["mean_neg_sim"] == pytest.approx(sum(others) / len(others), abs=1e-6)


def test_metrics_average_over_queries_and_more_relevant_than_k():
    queries = torch.cat([QUERY, QUERY])
    relevant = [{1}, {0, 1, 2, 3, 4}]
    got = retrieval_metrics(queries, CORPUS, relevant, ks=(3,))
    assert got["recall@3"] == pytest.approx((1 + 3 / 5) / 2)
    assert got["mrr@3"] == pytest.approx((1 / 2 + 1) / 2)
    ndcg_first = (1 / math.log2(3)) / 1.0
    assert got["ndcg@3"] == pytest.approx((ndcg_first + 1.0) / 2)  # top 3 all relevant: ideal


def test_k_larger_than_corpus():
    got = retrieval_metrics(QUERY, CORPUS[:3], [{2}], ks=(1, 10))
    assert got["recall@10"] == 1 and got["mrr@10"] == pytest.approx(1 / 3)
    assert got["ndcg@10"] == pytest.approx(0.5)


def test_chunking_and_input_types_do_not_change_results():
    g = torch.Generator().manual_seed(0)
    queries, corpus = torch.randn(37, 16, generator=g), torch.randn(50, 16, generator=g)
    relevant = [{i, (3 * i) % 50} for i in range(37)]
    whole = retrieval_metrics(queries, corpus, relevant)
    assert retrieval_metrics(queries.numpy(), corpus.double().numpy(), relevant, max_scores=1) \
        == pytest.approx(whole)
    assert retrieval_metrics(queries * 3, corpus, relevant, max_scores=120) == pytest.approx(whole)


def test_retrieval_rejects_bad_relevance():
    with pytest.raises(ValueError, match="query 0 has no relevant"):
        retrieval_metrics(QUERY, CORPUS, [set()])
    with pytest.raises(ValueError, match="outside the corpus"):
        retrieval_metrics(QUERY, CORPUS, [{15}])
    with pytest.raises(ValueError, match="2 entries for 1 queries"):
        retrieval_metrics(QUERY, CORPUS, [{0}, {1}])
    with pytest.raises(ValueError, match=r"\[n, d\]"):
        retrieval_metrics(QUERY[0], CORPUS, [{0}])


def _pairs_with_cosines(*cosines):
    docs = _at_angles(*[math.acos(c) for c in cosines])
    return QUERY.expand(len(cosines), 2), docs


def test_pair_metrics_monotone_and_reversed():
    queries, docs = _pairs_with_cosines(0.9, 0.5, 0.1, -0.3)
    got = pair_metrics(queries, docs, [4.0, 3.0, 2.5, 0.0])
    assert got["spearman"] == pytest.approx(1.0)
    assert pair_metrics(queries, docs, [0.0, 1.0, 2.0, 3.0])["spearman"] == pytest.approx(-1.0)


def test_pair_metrics_ties_use_average_ranks():
    queries, docs = _pairs_with_cosines(0.1, 0.2, 0.3, 0.4)
    got = pair_metrics(queries, docs, [0, 0, 1, 1])
    # label ranks [1.5, 1.5, 3.5, 3.5] vs [1, 2, 3, 4]: centred [-1,-1,1,1]·[-1.5,-.5,.5,1.5] = 4
    assert got["spearman"] == pytest.approx(4 / (2 * math.sqrt(5)))
    assert got["mean_pos"] == pytest.approx(0.35) and got["mean_neg"] == pytest.approx(0.15)


def test_pair_metrics_pearson_and_degenerate_cases():
    queries, docs = _pairs_with_cosines(0.0, 0.5, 1.0)
    got = pair_metrics(queries, docs, np.array([1.0, 2.0, 3.0]))
    assert got["pearson"] == pytest.approx(1.0)
    constant = pair_metrics(queries, docs, torch.ones(3))
    assert math.isnan(constant["spearman"]) and math.isnan(constant["mean_neg"])
    assert constant["mean_pos"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="disagree"):
        pair_metrics(queries, docs, [1.0, 2.0])


def test_spearman_matches_scipy_when_installed():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(1)
    queries, docs = torch.randn(40, 8, generator=g), torch.randn(40, 8, generator=g)
    labels = torch.randint(0, 5, (40,), generator=g).double()  # many ties
    cosine = torch.nn.functional.cosine_similarity(queries, docs).numpy()
    assert pair_metrics(queries, docs, labels)["spearman"] == pytest.approx(
        stats.spearmanr(cosine, labels.numpy()).statistic, abs=1e-6)
