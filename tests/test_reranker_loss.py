"""megaemb.tasks.reranker_loss against plain per-group PyTorch references written here, and
against ms-swift's definitions (swift/loss/reranker.py at modelscope/ms-swift 3602360:
``PointwiseRerankerLoss``, ``ListwiseRerankerLoss``), restated below in our own words."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megaemb.tasks.reranker_data import RerankSampling, parse_row, sample_groups
from megaemb.tasks.reranker_loss import (ListwiseConfig, listwise_kl_loss, listwise_loss,
                                         pointwise_loss)

SIZES = [3, 1, 5, 2, 4]  # a group of one: left out with the default min_group_size 2


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = sum(SIZES)
    scores = (torch.randn(n, generator=g, dtype=torch.float64) * 3).requires_grad_()
    teacher = torch.randn(n, generator=g, dtype=torch.float64) * 2
    labels = torch.cat([torch.tensor([1.0] + [0.0] * (s - 1), dtype=torch.float64)
                        for s in SIZES])
    return scores, teacher, labels


def grad_of(loss: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    return torch.autograd.grad(loss, scores, retain_graph=True)[0]


def reference_listwise(scores, sizes, temperature, min_group_size):
    """One F.cross_entropy per kept group, target 0, averaged."""
    losses = [F.cross_entropy((g / temperature)[None], torch.tensor([0]))
              for g in torch.split(scores, sizes) if len(g) >= min_group_size]
    return torch.stack(losses).mean()


def reference_kl(scores, teacher, sizes, temperature, teacher_temperature, min_group_size):
    """One F.kl_div per kept group, averaged."""
    losses = [F.kl_div(F.log_softmax(s / temperature, dim=0),
                       F.softmax(t / teacher_temperature, dim=0), reduction="sum")
              for s, t in zip(torch.split(scores, sizes), torch.split(teacher, sizes))
              if len(s) >= min_group_size]
    return torch.stack(losses).mean()


def ms_swift_listwise(logits, labels, temperature, min_group_size):
    """ms-swift's ListwiseRerankerLoss, restated: groups start at each label 1 and run to the
    next one; a group shorter than the minimum (or not starting with a positive) is skipped;
    each kept group is a cross-entropy of logits / temperature with target 0; the loss is the
    mean over kept groups (0 if none)."""
    starts = (labels == 1).nonzero().flatten().tolist() + [len(labels)]
    total, kept = 0.0, 0
    for begin, end in zip(starts, starts[1:]):
        if end - begin < min_group_size:
            continue
        group = logits[begin:end] / temperature
        total = total + (torch.logsumexp(group, 0) - group[0])
        kept += 1
    return total / kept if kept else torch.zeros(())


@pytest.mark.timeout(60)
@pytest.mark.parametrize("temperature,min_group_size", [(1.0, 2), (0.05, 2), (2.0, 4), (1.0, 1)])
def test_listwise_matches_the_reference_and_ms_swift(temperature, min_group_size):
    scores, _, labels = batch()
    ours = listwise_loss(scores, SIZES, temperature, min_group_size)
    ref = reference_listwise(scores, SIZES, temperature, min_group_size)
    swift = ms_swift_listwise(scores, labels, temperature, min_group_size)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours, swift, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_of(ours, scores), grad_of(ref, scores), rtol=1e-12, atol=1e-12)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("temperature,teacher_temperature,min_group_size",
                         [(1.0, 1.0, 2), (0.5, 2.0, 2), (1.0, 0.1, 3)])
def test_listwise_kl_matches_the_reference(temperature, teacher_temperature, min_group_size):
    scores, teacher, _ = batch(1)
    teacher.requires_grad_()
    ours = listwise_kl_loss(scores, teacher, SIZES, temperature, teacher_temperature,
                            min_group_size)
    ref = reference_kl(scores, teacher.detach(), SIZES, temperature, teacher_temperature,
                       min_group_size)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_of(ours, scores), grad_of(ref, scores), rtol=1e-12, atol=1e-12)
    assert torch.autograd.grad(ours, teacher, allow_unused=True)[0] is None  # a fixed target
    # the student that copies the teacher's distribution is the minimum, 0
    same = listwise_kl_loss(teacher.detach() * temperature / teacher_temperature, teacher, SIZES,
                            temperature, teacher_temperature, min_group_size)
    assert abs(float(same)) < 1e-12


@pytest.mark.timeout(60)
def test_pointwise_is_bce_and_the_two_way_cross_entropy_over_no_yes():
    scores, _, labels = batch(2)
    ours = pointwise_loss(scores, labels)
    p = torch.sigmoid(scores)
    ref = -(labels * torch.log(p) + (1 - labels) * torch.log(1 - p)).mean()
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    # ms-swift's PointwiseRerankerLoss is BCEWithLogitsLoss (mean) on the generative score
    # l_yes - l_no; that is the softmax cross-entropy over [l_no, l_yes] with yes for positives
    l_no = torch.randn(scores.shape, dtype=torch.float64)
    two_way = F.cross_entropy(torch.stack([l_no, l_no + scores], dim=1), labels.long())
    torch.testing.assert_close(ours, two_way, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_of(ours, scores), grad_of(ref, scores), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="scores and labels must both be"):
        pointwise_loss(scores, labels[:-1])


@pytest.mark.timeout(60)
def test_sampled_groups_laid_out_flat_are_what_ms_swift_reads():
    row = parse_row({"query": "q", "response": "p", "rejected_response": [f"n{i}" for i in range(9)]},
                    "t:1", "listwise_reranker")
    rng = np.random.default_rng(0)
    groups = [g for _ in range(3) for g in sample_groups(row, RerankSampling(max_negative=4), rng)]
    sizes = [len(g.documents) for g in groups]
    labels = torch.tensor([x for g in groups for x in g.labels], dtype=torch.float64)
    scores = torch.randn(len(labels), dtype=torch.float64)
    assert sizes == [5, 5, 5]
    torch.testing.assert_close(listwise_loss(scores, sizes), ms_swift_listwise(scores, labels, 1.0, 2))


@pytest.mark.timeout(60)
def test_no_group_kept_is_zero_with_a_gradient_path_and_bad_layouts_fail():
    scores = torch.randn(3, requires_grad=True)
    loss = listwise_loss(scores, [1, 1, 1])
    assert float(loss) == 0.0
    loss.backward()  # DDP needs every rank's loss to reach the parameters
    assert torch.equal(scores.grad, torch.zeros(3))
    with pytest.raises(ValueError, match="must be >= 1 each and sum to the 3 scores"):
        listwise_loss(scores, [2, 2])
    with pytest.raises(ValueError, match="must be >= 1 each"):
        listwise_loss(scores, [3, 0])


@pytest.mark.timeout(60)
def test_listwise_config_reads_the_ms_swift_variables(monkeypatch):
    assert ListwiseConfig.from_env({}) == ListwiseConfig(1.0, 2, 1.0)
    env = {"LISTWISE_RERANKER_TEMPERATURE": "0.05", "LISTWISE_RERANKER_MIN_GROUP_SIZE": "3",
           "LISTWISE_RERANKER_TEACHER_TEMPERATURE": "2"}
    assert ListwiseConfig.from_env(env) == ListwiseConfig(0.05, 3, 2.0)
    assert ListwiseConfig.from_env(env, temperature=0.5).temperature == 0.5
    monkeypatch.setenv("LISTWISE_RERANKER_TEMPERATURE", "0.2")
    assert ListwiseConfig.from_env().temperature == 0.2
    with pytest.raises(ValueError, match="LISTWISE_RERANKER_TEMPERATURE must be > 0"):
        ListwiseConfig.from_env({"LISTWISE_RERANKER_TEMPERATURE": "0"})
    with pytest.raises(ValueError, match="LISTWISE_RERANKER_MIN_GROUP_SIZE='two' is not an integer"):
        ListwiseConfig.from_env({"LISTWISE_RERANKER_MIN_GROUP_SIZE": "two"})
