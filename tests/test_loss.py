"""megaemb.loss against naive per-query PyTorch references, and DP=2 == DP=1 on gloo."""
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from distributed import run_distributed
from megaemb.loss import (InfoNCEConfig, all_gather_with_grad, contrastive_loss,
                          cosine_similarity_loss, info_nce, matryoshka, online_contrastive_loss)

pytestmark = pytest.mark.timeout(120)


def _unit(*shape, generator, dtype=torch.float64):
    return F.normalize(torch.randn(*shape, generator=generator, dtype=dtype), dim=-1)


def _triplet(b=5, k=3, d=8, seed=0, dtype=torch.float64, fake=True):
    """Random unit queries/positives/negatives; with ``fake`` each query's first negative is
    a near copy of the query (a fake negative, cosine ~0.99)."""
    g = torch.Generator().manual_seed(seed)
    q, p, n = _unit(b, d, generator=g, dtype=dtype), _unit(b, d, generator=g, dtype=dtype), \
        _unit(b, k, d, generator=g, dtype=dtype)
    if fake and k:
        n[:, 0] = F.normalize(q + 0.1 * _unit(b, d, generator=g, dtype=dtype), dim=-1)
    return q, p, n


def _naive_info_nce(q, p, n, temperature=0.01, use_batch=True, hard_negatives=None,
                    mask_fake_negative=False, fake_negative_margin=0.1, include_qq=False,
                    include_dd=False, keys=None):
    """One query at a time: list its candidate cosines (own positive first), skip masked ones
    and, with text ``keys`` (queries, positives, negatives), copies of its own texts."""
    if hard_negatives is not None:
        n = n[:, :hard_negatives]
    b, k = n.shape[:2]
    kq, kp, kn = keys if keys is not None else (torch.arange(b), -1 - torch.arange(b),
                                               torch.full((b, k), -10 ** 9).sub(torch.arange(b * k).view(b, k)))
    kn = kn[:, :k]
    docs = [p[j] for j in range(b)] + [n[j, m] for j in range(b) for m in range(k)]
    doc_keys = [kp[j] for j in range(b)] + [kn[j, m] for j in range(b) for m in range(k)]
    losses = []
    for i in range(b):
        positive = torch.dot(q[i], p[i])
        threshold = positive.detach() + fake_negative_margin

        def keep(score):
            return not (mask_fake_negative and score > threshold)

        scores = [positive]
        if use_batch:
            scores += [s for j, doc in enumerate(docs) if j != i and doc_keys[j] != kp[i]
                       for s in [torch.dot(q[i], doc)] if keep(s)]
            if include_qq:
                scores += [s for j in range(b) if j != i and kq[j] != kq[i]
                           for s in [torch.dot(q[i], q[j])] if keep(s)]
            if include_dd:
                scores += [torch.dot(p[i], doc) for j, doc in enumerate(docs)
                           if j != i and doc_keys[j] != kp[i]]
        else:
            scores += [s for m in range(k) if kn[i, m] != kp[i]
                       for s in [torch.dot(q[i], n[i, m])] if keep(s)]
        logits = torch.stack(scores) / temperature
        losses.append(F.cross_entropy(logits[None], torch.tensor([0])))
    return torch.stack(losses).mean()


def _value_and_grads(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    value = fn(*leaves)
    return value.detach(), torch.autograd.grad(value, leaves, allow_unused=True)


def _assert_close(a, b, tol=1e-6):
    assert torch.allclose(a, b, rtol=tol, atol=tol), (a - b).abs().max()


INFO_NCE_CASES = [
    dict(),
    dict(temperature=0.05),
    dict(use_batch=False),
    dict(use_batch=False, mask_fake_negative=True),
    dict(hard_negatives=2),
    dict(hard_negatives=10),
    dict(mask_fake_negative=True),
    dict(include_qq=True),
    dict(include_dd=True),
    dict(include_qq=True, include_dd=True, mask_fake_negative=True, hard_negatives=1),
]


@pytest.mark.parametrize("kwargs", INFO_NCE_CASES, ids=lambda c: ",".join(c) or "default")
def test_info_nce_matches_naive(kwargs):
    q, p, n = _triplet()
    cfg = InfoNCEConfig(**kwargs)
    got, got_grads = _value_and_grads(lambda *t: info_nce(*t, cfg), q, p, n)
    want, want_grads = _value_and_grads(lambda *t: _naive_info_nce(*t, **kwargs), q, p, n)
    _assert_close(got, want)
    for g, w in zip(got_grads, want_grads):
        _assert_close(g, torch.zeros_like(g) if w is None else w)


def _with_copies(b=6, k=3, seed=0, dtype=torch.float64):
    """A triplet whose row b-2 repeats row 1 (``#N``, or a step over an epoch's end) and whose
    row 2 lists its own positive as a hard negative, with the texts' content keys."""
    q, p, n = _triplet(b=b, k=k, seed=seed, dtype=dtype, fake=False)
    p = F.normalize(q + 0.3 * p, dim=-1)  # trained-like: the positive scores highest
    kq, kp, kn = torch.arange(b), 100 + torch.arange(b), 200 + torch.arange(b * k).view(b, k)
    for t, key in ((q, kq), (p, kp), (n, kn)):
        t[b - 2], key[b - 2] = t[1], key[1]
    n[2, 1], kn[2, 1] = p[2], kp[2]
    return (q, p, n), (kq, kp, kn)


@pytest.mark.parametrize("kwargs", INFO_NCE_CASES, ids=lambda c: ",".join(c) or "default")
def test_a_text_is_never_its_own_querys_negative(kwargs):
    """With text keys, copies of a row's positive (a repeated row's, or one listed among its
    own hard negatives) and of its query are no candidates; without keys they are."""
    (q, p, n), keys = _with_copies()
    cfg = InfoNCEConfig(**kwargs)
    got, got_grads = _value_and_grads(lambda *t: info_nce(*t, cfg, keys=keys), q, p, n)
    want, want_grads = _value_and_grads(lambda *t: _naive_info_nce(*t, **kwargs, keys=keys), q, p, n)
    _assert_close(got, want)
    for g, w in zip(got_grads, want_grads):
        _assert_close(g, torch.zeros_like(g) if w is None else w)
    assert got < info_nce(q, p, n, cfg) - 1e-3  # the copies were scored as negatives before


@pytest.mark.parametrize("use_batch", [True, False])
def test_info_nce_without_negatives(use_batch):
    q, p, n = _triplet(k=0)
    cfg = InfoNCEConfig(use_batch=use_batch)
    _assert_close(info_nce(q, p, n, cfg), _naive_info_nce(q, p, n, use_batch=use_batch))
    if not use_batch:  # only the positive is a candidate
        assert info_nce(q, p, n, cfg).item() == 0


def test_info_nce_default_config_and_fp32():
    q, p, n = _triplet(dtype=torch.float32)
    loss = info_nce(q, p, n)
    assert loss.dtype == torch.float32
    _assert_close(loss.double(), _naive_info_nce(q.double(), p.double(), n.double()), tol=1e-4)


def test_hard_negatives_keeps_the_first_ones():
    q, p, n = _triplet(k=4)
    _assert_close(info_nce(q, p, n, InfoNCEConfig(hard_negatives=2)),
                  info_nce(q, p, n[:, :2], InfoNCEConfig()))
    _assert_close(info_nce(q, p, n, InfoNCEConfig(hard_negatives=0)),
                  info_nce(q, p, n[:, :0], InfoNCEConfig()))


@pytest.mark.parametrize("use_batch", [True, False])
def test_mask_fake_negative_drops_near_duplicates(use_batch):
    q, p, n = _triplet()
    p = F.normalize(q + p, dim=-1)  # cosine ~0.7: only the fake negatives exceed +0.1
    assert ((q * p).sum(-1) + 0.1 < (q * n[:, 0]).sum(-1)).all()
    n = n.clone().requires_grad_()
    plain = info_nce(q, p, n, InfoNCEConfig(use_batch=use_batch))
    masked = info_nce(q, p, n, InfoNCEConfig(use_batch=use_batch, mask_fake_negative=True))
    assert masked < plain  # the fake negatives (cosine ~0.99) dominated the loss
    _assert_close(masked, _naive_info_nce(q, p, n, use_batch=use_batch, mask_fake_negative=True))
    if not use_batch:  # (in-batch, query j's fake negative is an ordinary negative for query i)
        _assert_close(masked, info_nce(q, p, n[:, 1:], InfoNCEConfig(use_batch=False)))
        (grad,) = torch.autograd.grad(masked, n)
        assert grad[:, 0].abs().max() == 0


def test_mask_fake_negative_margin():
    q, p, n = _triplet()
    wide = InfoNCEConfig(mask_fake_negative=True, fake_negative_margin=10.0)
    _assert_close(info_nce(q, p, n, wide), info_nce(q, p, n, InfoNCEConfig()))


@pytest.mark.parametrize("extra", [dict(include_qq=True), dict(include_dd=True)])
def test_include_qq_dd_add_denominator_terms(extra):
    q, p, n = _triplet(fake=False)
    base = info_nce(q, p, n, InfoNCEConfig())
    more = info_nce(q, p, n, InfoNCEConfig(**extra))
    assert more > base
    _assert_close(more, _naive_info_nce(q, p, n, **extra))


def test_config_from_env(monkeypatch):
    assert InfoNCEConfig.from_env() == InfoNCEConfig()
    monkeypatch.setenv("INFONCE_TEMPERATURE", "0.05")
    monkeypatch.setenv("INFONCE_USE_BATCH", "True")
    monkeypatch.setenv("INFONCE_HARD_NEGATIVES", "7")
    monkeypatch.setenv("INFONCE_MASK_FAKE_NEGATIVE", "yes")
    monkeypatch.setenv("INFONCE_FAKE_NEG_MARGIN", "0.2")
    monkeypatch.setenv("INFONCE_INCLUDE_QQ", "1")
    monkeypatch.setenv("INFONCE_INCLUDE_DD", "on")
    assert InfoNCEConfig.from_env() == InfoNCEConfig(
        temperature=0.05, use_batch=True, hard_negatives=7, mask_fake_negative=True,
        fake_negative_margin=0.2, include_qq=True, include_dd=True)
    cfg = InfoNCEConfig.from_env(temperature=0.5, hard_negatives=None, include_qq=False)
    assert (cfg.temperature, cfg.hard_negatives, cfg.include_qq) == (0.5, 7, False)


@pytest.mark.parametrize("var,value", [
    ("INFONCE_TEMPERATURE", "warm"), ("INFONCE_TEMPERATURE", "0"),
    ("INFONCE_USE_BATCH", "maybe"), ("INFONCE_HARD_NEGATIVES", "2.5"),
    ("INFONCE_HARD_NEGATIVES", "-1"), ("INFONCE_MASK_FAKE_NEGATIVE", "2"),
    ("INFONCE_FAKE_NEG_MARGIN", "x"), ("INFONCE_INCLUDE_QQ", ""), ("INFONCE_INCLUDE_DD", "nope"),
])
def test_config_from_env_rejects_bad_values(monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    with pytest.raises(ValueError, match=var):
        InfoNCEConfig.from_env()


def test_config_rejects_inconsistent_settings():
    with pytest.raises(ValueError, match="INFONCE_USE_BATCH"):
        InfoNCEConfig(use_batch=False, include_qq=True)
    with pytest.raises(TypeError, match="temprature"):
        InfoNCEConfig.from_env(temprature=0.1)


def test_info_nce_rejects_bad_shapes():
    q, p, n = _triplet()
    with pytest.raises(ValueError, match="positives"):
        info_nce(q, p[:-1], n)
    with pytest.raises(ValueError, match="negatives"):
        info_nce(q, p, n[:, :, :-1])


def test_all_gather_with_grad_without_group_is_identity():
    x = torch.ones(2, 3)
    assert all_gather_with_grad(x, None) is x


def _pairs(n=12, d=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    a, b = _unit(n, d, generator=g), _unit(n, d, generator=g)
    b[: n // 2] = F.normalize(a[: n // 2] + 0.5 * b[: n // 2], dim=-1)  # some similar pairs
    labels = torch.tensor([1, 0] * (n // 2), dtype=torch.float64)
    return a, b, labels


def _naive_cos(x, y):
    return torch.dot(x, y) / (x.norm() * y.norm())


def _naive_cosine_similarity(a, b, labels):
    return sum((_naive_cos(a[i], b[i]) - labels[i]) ** 2 for i in range(len(a))) / len(a)


def _naive_contrastive(a, b, labels, margin=0.5):
    total = 0
    for i in range(len(a)):
        dist_i = 1 - _naive_cos(a[i], b[i])
        total = total + (0.5 * dist_i**2 if labels[i] == 1 else 0.5 * F.relu(margin - dist_i) ** 2)
    return total / len(a)


def _naive_online_contrastive(a, b, labels, margin=0.5):
    dists = [1 - _naive_cos(a[i], b[i]) for i in range(len(a))]
    pos = [x for x, y in zip(dists, labels) if y == 1]
    neg = [x for x, y in zip(dists, labels) if y == 0]
    neg_cut = max(pos) if len(pos) > 1 else sum(neg) / len(neg)
    pos_cut = min(neg) if len(neg) > 1 else sum(pos) / len(pos)
    total = torch.zeros((), dtype=a.dtype)
    for x in pos:
        if x > pos_cut:
            total = total + x**2
    for x in neg:
        if x < neg_cut:
            total = total + F.relu(margin - x) ** 2
    return total


@pytest.mark.parametrize("ours,naive", [
    (cosine_similarity_loss, _naive_cosine_similarity),
    (contrastive_loss, _naive_contrastive),
    (online_contrastive_loss, _naive_online_contrastive),
])
@pytest.mark.parametrize("label_pattern", ["mixed", "one_positive", "one_negative"])
def test_pair_losses_match_naive(ours, naive, label_pattern):
    a, b, labels = _pairs()
    if label_pattern == "one_positive":
        labels = torch.zeros_like(labels)
        labels[0] = 1
    elif label_pattern == "one_negative":
        labels = torch.ones_like(labels)
        labels[1] = 0
    got, got_grads = _value_and_grads(lambda x, y: ours(x, y, labels), a, b)
    want, want_grads = _value_and_grads(lambda x, y: naive(x, y, labels), a, b)
    _assert_close(got, want)
    for g, w in zip(got_grads, want_grads):
        _assert_close(g, w)


def test_online_contrastive_keeps_only_hard_pairs():
    a = torch.tensor([[1.0, 0.0]] * 4, dtype=torch.float64)
    angles = torch.tensor([0.1, 1.2, 0.2, 1.5], dtype=torch.float64)  # pos, pos, neg, neg
    b = torch.stack([angles.cos(), angles.sin()], dim=1)
    labels = torch.tensor([1, 1, 0, 0])
    d = 1 - angles.cos()
    # hard positives: d > min neg d = d[2] -> only d[1]; hard negatives: d < max pos d = d[1]
    # -> only d[2] (d[3] > d[1]).
    want = d[1] ** 2 + F.relu(0.5 - d[2]) ** 2
    _assert_close(online_contrastive_loss(a, b, labels), want)


def test_matryoshka_sums_truncated_renormalised_losses():
    q, p, n = _triplet(d=8)
    cfg = InfoNCEConfig(include_dd=True)
    dims = [2, 4, 8]

    def by_hand(q, p, n):
        return sum(_naive_info_nce(F.normalize(q[:, :m], dim=-1), F.normalize(p[:, :m], dim=-1),
                                   F.normalize(n[..., :m], dim=-1), include_dd=True)
                   for m in dims)

    got, got_grads = _value_and_grads(lambda *t: matryoshka(info_nce, dims)(*t, cfg=cfg), q, p, n)
    want, want_grads = _value_and_grads(by_hand, q, p, n)
    _assert_close(got, want)
    for g, w in zip(got_grads, want_grads):
        _assert_close(g, w)
    a, b, labels = _pairs()
    _assert_close(matryoshka(contrastive_loss, [3])(a, b, labels=labels, margin=0.3),
                  _naive_contrastive(F.normalize(a[:, :3], dim=-1), F.normalize(b[:, :3], dim=-1),
                                     labels, margin=0.3))
    with pytest.raises(ValueError, match="exceeds"):
        matryoshka(cosine_similarity_loss, [16])(a, b, labels)
    with pytest.raises(ValueError):
        matryoshka(cosine_similarity_loss, [])


DP_CASES = {
    "in_batch": dict(temperature=0.05),
    "hard_negatives": dict(temperature=0.05, hard_negatives=2),
    "qq_dd_mask": dict(temperature=0.05, include_qq=True, include_dd=True, mask_fake_negative=True),
    "own_only": dict(temperature=0.05, use_batch=False),
    "copies": dict(temperature=0.05, include_qq=True, include_dd=True),  # last: with text keys
}


def _relative_error(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


def _dp_worker(rank, world, b, k, d):
    """Compares DP=world on this rank's rows with DP=1 on all rows; returns relative errors."""
    dist.init_process_group("gloo")
    group = dist.group.WORLD
    errors = {}

    x = torch.arange(6.0).view(3, 2).add(10 * rank).requires_grad_()
    gathered = all_gather_with_grad(x, group)
    weights = torch.arange(world * 6.0).view(world * 3, 2) * (rank + 1)  # differs per rank
    (grad,) = torch.autograd.grad((gathered * weights).sum(), x)
    rows = slice(rank * 3, (rank + 1) * 3)
    expected = sum(weights[rows] / (rank + 1) * (r + 1) for r in range(world))
    errors["gather_forward"] = (gathered.detach() - torch.cat(
        [torch.arange(6.0).view(3, 2) + 10 * r for r in range(world)])).abs().max().item()
    errors["gather_backward"] = (grad - expected).abs().max().item()

    full = _triplet(b=world * b, k=k, d=d, seed=3, dtype=torch.float32)
    local = [t[rank * b:(rank + 1) * b] for t in full]
    full_keys = None
    for name, kwargs in DP_CASES.items():
        if name == "copies":  # a row of rank 0 repeated on rank 1, keys gathered like embeddings
            full, full_keys = _with_copies(b=world * b, k=k, seed=3, dtype=torch.float32)
            local = [t[rank * b:(rank + 1) * b] for t in full]
        keys = full_keys and tuple(t[rank * b:(rank + 1) * b] for t in full_keys)
        cfg = InfoNCEConfig(**kwargs)
        loss1, grads1 = _value_and_grads(lambda *t: info_nce(*t, cfg, keys=full_keys), *full)
        loss2, grads2 = _value_and_grads(lambda *t: info_nce(*t, cfg, group=group, keys=keys), *local)
        dist.all_reduce(loss2)  # DDP-style: mean of per-rank losses, mean of per-rank grads
        errors[name + "_loss"] = _relative_error(loss2 / world, loss1)
        for what, g2, g1 in zip("qpn", grads2, grads1):
            errors[f"{name}_grad_{what}"] = _relative_error(g2 / world, g1[rank * b:(rank + 1) * b])
    return errors


def test_data_parallel_equals_single_process():
    for rank_errors in run_distributed(_dp_worker, 2, 4, 3, 16, timeout=100):
        assert rank_errors["gather_forward"] == 0 and rank_errors["gather_backward"] == 0
        bad = {key: err for key, err in rank_errors.items() if not err <= 1e-6}
        assert not bad, bad
        assert math.isfinite(sum(rank_errors.values()))
