"""Embedding losses: pure functions of L2-normalised embeddings and a data-parallel group.

Shapes: ``b`` rows on this rank, ``d`` embedding width, ``k`` hard negatives per query,
``W`` ranks in the data-parallel group. All losses take fp32 (or fp64) tensors that are
already L2-normalised, so a dot product is the cosine similarity.

Exact large-batch contrastive training: :func:`info_nce` with ``use_batch`` all-gathers
queries/documents over the data-parallel ``group`` *with* gradient
(:func:`all_gather_with_grad`). Averaging the per-rank losses over ranks gives the loss of
DP=1 on the concatenated batch, and averaging the per-rank parameter gradients over ranks
(as DDP does) gives its gradients. Negatives never cross tensor- or pipeline-parallel
groups: pass only the data-parallel group.

The pair losses (:func:`cosine_similarity_loss`, :func:`contrastive_loss`,
:func:`online_contrastive_loss`) follow sentence-transformers. :class:`GroupLoss` is what
training optimises: one of these over a rank's groups, laid out as the batch builders lay
them out; it gathers pairs over the data-parallel group too, so every loss of DP=N equals
DP=1 on the concatenated batch.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F

# Newer torch renames the tensor collectives (the old names still work but warn).
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _group_size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _group_rank(group: dist.ProcessGroup | None) -> int:
    return 0 if group is None else dist.get_rank(group)


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: all-gather ``[n, ...]`` → ``[W*n, ...]`` (rank-major). Backward: this rank's
    ``[n, ...]`` slice of the sum over ranks of the incoming gradient (reduce-scatter)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        out = x.new_empty((_group_size(group) * x.shape[0], *x.shape[1:]))
        _all_gather_single(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        out = grad.new_empty((grad.shape[0] // _group_size(ctx.group), *grad.shape[1:]))
        _reduce_scatter_single(out, grad.contiguous(), group=ctx.group)
        return out, None


def all_gather_with_grad(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """All-gather ``x [n, ...]`` over ``group`` into ``[W*n, ...]``, rank ``r`` at rows
    ``r*n:(r+1)*n``, keeping the gradient path to every rank's input.

    The backward of rank ``r`` returns the sum over ranks of their gradient for rows
    ``r*n:(r+1)*n``, so if every rank computes a loss ``L_s`` from the gathered tensor, rank
    ``r`` receives ``sum_s dL_s/dx_r``. All ranks must pass the same ``n`` (and trailing
    shape). Identity when ``group`` is None or has one rank.
    """
    if _group_size(group) == 1:
        return x
    return _AllGatherWithGrad.apply(x, group)


_TRUE = {"1", "true", "yes", "y", "on", "t"}
_FALSE = {"0", "false", "no", "n", "off", "f"}


def _parse_bool(var: str, text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE | _FALSE:
        return value in _TRUE
    raise ValueError(f"{var}={text!r} is not a boolean (use true/false, 1/0, yes/no, on/off)")


def _parse_float(var: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{var}={text!r} is not a number") from None


def _parse_int(var: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{var}={text!r} is not an integer") from None


def _parse_optional_int(var: str, text: str) -> int | None:
    if text.strip().lower() in {"", "none"}:
        return None
    return _parse_int(var, text)


def config_from_env(cls, table: dict, overrides: dict, env=os.environ):
    """A ``cls`` (a dataclass) from its defaults, then the environment variables of ``table``
    (field -> ``(VARIABLE, parse)``), then the ``overrides`` that are not None. A malformed
    variable raises ValueError naming it; an unknown override raises TypeError."""
    unknown = set(overrides) - set(table)
    if unknown:
        raise TypeError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    values = {}
    for field, (var, parse) in table.items():
        if overrides.get(field) is not None:
            values[field] = overrides[field]
        elif var in env:
            values[field] = parse(var, env[var])
    return cls(**values)


@dataclass(frozen=True)
class InfoNCEConfig:
    """InfoNCE settings; each field has the ms-swift environment variable named beside it.

    temperature           INFONCE_TEMPERATURE         logits are cosine / temperature.
    use_batch             INFONCE_USE_BATCH           True: candidates are every positive and
                          every hard negative of the whole gathered data-parallel batch.
                          False: only the query's own positive and own hard negatives.
    hard_negatives        INFONCE_HARD_NEGATIVES      keep the first ``min(k, n)`` hard
                          negatives of each query; None keeps all ``k`` (no resampling: the
                          data layer must give every query the same ``k``).
    mask_fake_negative    INFONCE_MASK_FAKE_NEGATIVE  drop query–candidate logits whose cosine
                          exceeds the query's positive cosine + ``fake_negative_margin``
                          (threshold not differentiated). Applies to query–document and
                          query–query logits, in both ``use_batch`` modes; not to the
                          document–document logits (as ms-swift).
    fake_negative_margin  INFONCE_FAKE_NEG_MARGIN     that margin (0.1).
    include_qq            INFONCE_INCLUDE_QQ          add query_i · query_j (j ≠ i, whole
                          gathered batch) to the denominator (Qwen3-Embedding).
    include_dd            INFONCE_INCLUDE_DD          add positive_i · doc_j for every gathered
                          document (positives and hard negatives) except positive_i itself.
    include_qq / include_dd need ``use_batch``.
    """

    temperature: float = 0.01
    use_batch: bool = True
    hard_negatives: int | None = None
    mask_fake_negative: bool = False
    fake_negative_margin: float = 0.1
    include_qq: bool = False
    include_dd: bool = False

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError("temperature (INFONCE_TEMPERATURE) must be > 0, "
                             f"got {self.temperature}")
        if self.hard_negatives is not None and self.hard_negatives < 0:
            raise ValueError("hard_negatives (INFONCE_HARD_NEGATIVES) must be >= 0 or None, "
                             f"got {self.hard_negatives}")
        if not self.fake_negative_margin >= 0:
            raise ValueError("fake_negative_margin (INFONCE_FAKE_NEG_MARGIN) must be >= 0, "
                             f"got {self.fake_negative_margin}")
        if (self.include_qq or self.include_dd) and not self.use_batch:
            raise ValueError("include_qq / include_dd (INFONCE_INCLUDE_QQ / INFONCE_INCLUDE_DD) "
                             "need use_batch (INFONCE_USE_BATCH=true)")

    def negatives_per_query(self, groups: int, k: int) -> int:
        """Candidates other than the positive that each query is scored against, when the
        loss sees ``groups`` groups of ``k`` hard negatives (before fake-negative masking)."""
        k = k if self.hard_negatives is None else min(k, self.hard_negatives)
        if not self.use_batch:
            return k
        docs = groups * (1 + k)
        return (docs - 1 + (groups - 1 if self.include_qq else 0)
                + (docs - 1 if self.include_dd else 0))

    @classmethod
    def from_env(cls, **overrides) -> InfoNCEConfig:
        """Defaults, then the INFONCE_* environment variables, then the ``overrides`` that are
        not None. A malformed variable raises ValueError naming it."""
        return config_from_env(cls, _ENV, overrides)


_ENV = {
    "temperature": ("INFONCE_TEMPERATURE", _parse_float),
    "use_batch": ("INFONCE_USE_BATCH", _parse_bool),
    "hard_negatives": ("INFONCE_HARD_NEGATIVES", _parse_optional_int),
    "mask_fake_negative": ("INFONCE_MASK_FAKE_NEGATIVE", _parse_bool),
    "fake_negative_margin": ("INFONCE_FAKE_NEG_MARGIN", _parse_float),
    "include_qq": ("INFONCE_INCLUDE_QQ", _parse_bool),
    "include_dd": ("INFONCE_INCLUDE_DD", _parse_bool),
}


def _check_triplet(queries: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor):
    if queries.dim() != 2 or positives.shape != queries.shape:
        raise ValueError(f"queries and positives must both be [b, d], got {tuple(queries.shape)} "
                         f"and {tuple(positives.shape)}")
    b, d = queries.shape
    if negatives.dim() != 3 or negatives.shape[0] != b or negatives.shape[2] != d:
        raise ValueError(f"negatives must be [b={b}, k, d={d}], got {tuple(negatives.shape)}")


def _mask_fake(scores: torch.Tensor, positive: torch.Tensor, margin: float) -> torch.Tensor:
    """``scores [b, m]`` with entries above ``positive [b, 1] + margin`` set to -inf."""
    return scores.masked_fill(scores > positive.detach() + margin, float("-inf"))


def _mask_columns(scores: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """``scores [b, m]`` with ``scores[i, columns[i]]`` set to -inf."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask[torch.arange(scores.shape[0], device=scores.device), columns] = True
    return scores.masked_fill(mask, float("-inf"))


def _mask_copies(scores: torch.Tensor, own: torch.Tensor, keys: torch.Tensor,
                 keep: torch.Tensor | None = None) -> torch.Tensor:
    """``scores [b, m]`` with -inf where candidate ``j``'s text key ``keys[j]`` equals row
    ``i``'s ``own[i]`` (a copy of the row's own text: a repeated row, ``#N``, a step over an
    epoch's end), except column ``keep[i]`` (the row's own positive)."""
    same = own[:, None] == keys[None, :]
    if keep is not None:
        same[torch.arange(own.shape[0], device=own.device), keep] = False
    return scores.masked_fill(same, float("-inf"))


def _own_logits(queries, positives, negatives, cfg: InfoNCEConfig, keys=None):
    """Candidates = own positive + own hard negatives: logits ``[b, 1+k]``, target 0."""
    positive = (queries * positives).sum(-1, keepdim=True)  # [b, 1]
    negative = torch.einsum("bd,bkd->bk", queries, negatives)  # [b, k]
    if keys is not None:  # a hard negative that is the positive's text
        negative = negative.masked_fill(keys[2] == keys[1][:, None], float("-inf"))
    if cfg.mask_fake_negative:
        negative = _mask_fake(negative, positive, cfg.fake_negative_margin)
    target = torch.zeros(queries.shape[0], dtype=torch.long, device=queries.device)
    return torch.cat([positive, negative], dim=1), target


def _batch_logits(queries, positives, negatives, cfg: InfoNCEConfig, group, keys=None):
    """Candidates over the gathered batch of ``B = W*b`` rows and ``B*k`` negatives.

    Columns: ``[B]`` positives, ``[B*k]`` negatives, then ``[B]`` queries if include_qq, then
    ``[B + B*k]`` positive-to-document cosines if include_dd. Target of local row ``i`` is the
    column of its own positive, ``rank*b + i``. With text ``keys``, a document that is the
    row's own positive text (other than the target) and a query that is its own query text
    are no candidates.
    """
    b, k, d = negatives.shape
    docs = all_gather_with_grad(positives, group)  # [B, d]
    if k:
        docs = torch.cat([docs, all_gather_with_grad(negatives.reshape(b * k, d), group)])
    target = _group_rank(group) * b + torch.arange(b, device=queries.device)
    qd = queries @ docs.T  # [b, B + B*k]
    positive = qd.gather(1, target[:, None])  # [b, 1]
    if keys is not None:
        q_keys, p_keys, n_keys = keys
        doc_keys = _all_gather(p_keys, group)
        if k:
            doc_keys = torch.cat([doc_keys, _all_gather(n_keys.reshape(b * k), group)])
        qd = _mask_copies(qd, p_keys, doc_keys, keep=target)
    blocks = [_mask_fake(qd, positive, cfg.fake_negative_margin) if cfg.mask_fake_negative else qd]
    if cfg.include_qq:
        qq = _mask_columns(queries @ all_gather_with_grad(queries, group).T, target)  # [b, B]
        if keys is not None:
            qq = _mask_copies(qq, q_keys, _all_gather(q_keys, group))
        blocks.append(_mask_fake(qq, positive, cfg.fake_negative_margin)
                      if cfg.mask_fake_negative else qq)
    if cfg.include_dd:
        dd = _mask_columns(positives @ docs.T, target)  # [b, B + B*k]
        blocks.append(dd if keys is None else _mask_copies(dd, p_keys, doc_keys))
    return torch.cat(blocks, dim=1), target


def info_nce(queries: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor,
             cfg: InfoNCEConfig | None = None,
             group: dist.ProcessGroup | None = None,
             keys: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """InfoNCE over normalised embeddings; scalar mean over this rank's ``b`` queries.

    queries ``[b, d]``, positives ``[b, d]`` (row i is query i's positive), negatives
    ``[b, k, d]`` (k may be 0). Loss_i = cross-entropy of ``logits_i / temperature`` with the
    query's own positive as target; the candidate set is described in
    :class:`InfoNCEConfig`. With ``cfg.use_batch`` and a data-parallel ``group``, candidates
    are gathered with gradient from all ranks, which must all pass the same ``b`` and ``k``.
    ``keys``: int64 content keys of the texts (queries ``[b]``, positives ``[b]``, negatives
    ``[b, k]``; equal texts, equal keys): a text is then never its own query's negative (see
    ``_batch_logits``); None compares nothing.
    """
    cfg = cfg or InfoNCEConfig()
    _check_triplet(queries, positives, negatives)
    if cfg.hard_negatives is not None:
        negatives = negatives[:, :cfg.hard_negatives]
        keys = keys and (keys[0], keys[1], keys[2][:, :cfg.hard_negatives])
    if cfg.use_batch:
        logits, target = _batch_logits(queries, positives, negatives, cfg, group, keys)
    else:
        logits, target = _own_logits(queries, positives, negatives, cfg, keys)
    return F.cross_entropy(logits / cfg.temperature, target)


def _cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``1 - cos(a_i, b_i)`` for ``a, b [n, d]`` → ``[n]``."""
    return 1 - F.cosine_similarity(a, b, dim=-1)


def cosine_similarity_loss(a: torch.Tensor, b: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean squared error between ``cos(a_i, b_i)`` and ``labels [n]`` (float in [-1, 1]);
    ``a, b [n, d]``. sentence-transformers ``CosineSimilarityLoss``."""
    cosine = F.cosine_similarity(a, b, dim=-1)
    return F.mse_loss(cosine, labels.to(cosine.dtype))


def contrastive_loss(a: torch.Tensor, b: torch.Tensor, labels: torch.Tensor,
                     margin: float = 0.5) -> torch.Tensor:
    """Mean over pairs of ``0.5 * (y * D**2 + (1 - y) * relu(margin - D)**2)``, ``D = 1 - cos``;
    ``a, b [n, d]``, ``labels [n]`` in {0, 1}. sentence-transformers ``ContrastiveLoss`` with
    cosine distance and ``size_average=True``."""
    distance = _cosine_distance(a, b)
    y = labels.to(distance.dtype)
    return (0.5 * (y * distance.pow(2) + (1 - y) * F.relu(margin - distance).pow(2))).mean()


def online_contrastive_loss(a: torch.Tensor, b: torch.Tensor, labels: torch.Tensor,
                            margin: float = 0.5) -> torch.Tensor:
    """Contrastive loss on the hard pairs only, summed (not averaged); ``a, b [n, d]``,
    ``labels [n]`` in {0, 1}, ``D = 1 - cos``. sentence-transformers ``OnlineContrastiveLoss``:

    hard positives: positives with ``D > min(D of negatives)`` (``> mean(D of positives)``
    when there is at most one negative); hard negatives: negatives with
    ``D < max(D of positives)`` (``< mean(D of negatives)`` when there is at most one
    positive). Loss = ``sum(D_hp**2) + sum(relu(margin - D_hn)**2)``.
    """
    distance = _cosine_distance(a, b)
    positives, negatives = distance[labels == 1], distance[labels == 0]
    negative_cut = positives.max() if len(positives) > 1 else negatives.mean()
    positive_cut = negatives.min() if len(negatives) > 1 else positives.mean()
    hard_negatives = negatives[negatives < negative_cut]
    hard_positives = positives[positives > positive_cut]
    return hard_positives.pow(2).sum() + F.relu(margin - hard_negatives).pow(2).sum()


def _truncate(x, dim: int):
    """Embeddings (tensors with ``ndim >= 2``, ``[..., d]``) → first ``dim`` features,
    re-normalised; anything else unchanged."""
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        return x
    if dim > x.shape[-1]:
        raise ValueError(f"matryoshka dim {dim} exceeds embedding width {x.shape[-1]}")
    return F.normalize(x[..., :dim], dim=-1)


def matryoshka(loss_fn: Callable[..., torch.Tensor],
               dims: Sequence[int]) -> Callable[..., torch.Tensor]:
    """Matryoshka wrapper: ``sum over dim in dims of loss_fn(truncated args)``, weight 1 each.

    Every tensor argument with ``ndim >= 2`` (positional or keyword) is an embedding
    ``[..., d]``: it is cut to its first ``dim`` features and L2-normalised again. Other
    arguments (labels ``[n]``, configs, groups) pass through unchanged. Include the full
    width in ``dims`` to keep the full-width loss.
    """
    dims = list(dims)
    if not dims or any(dim <= 0 for dim in dims):
        raise ValueError(f"matryoshka dims must be a non-empty list of positive ints, got {dims}")

    def loss(*args, **kwargs) -> torch.Tensor:
        return sum(loss_fn(*[_truncate(a, dim) for a in args],
                           **{key: _truncate(v, dim) for key, v in kwargs.items()})
                   for dim in dims)

    return loss


PAIR_LOSSES = {"cosine_similarity": cosine_similarity_loss, "contrastive": contrastive_loss,
               "online_contrastive": online_contrastive_loss}
LOSS_TYPES = ("infonce", *PAIR_LOSSES)


def _all_gather(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """All-gather without gradient: ``[n, ...]`` -> ``[W*n, ...]``, rank-major."""
    if _group_size(group) == 1:
        return x
    out = x.new_empty((_group_size(group) * x.shape[0], *x.shape[1:]))
    _all_gather_single(out, x.contiguous(), group=group)
    return out


@dataclass(frozen=True)
class GroupLoss:
    """The training loss of ``m`` groups on one data-parallel rank.

    ``emb [m*(2+k), d]`` (normalised) holds the groups' embeddings as ``GroupBatch`` lays out
    their texts: ``[q_1..q_m, p_1..p_m, n_11..n_1k, ..., n_m1..n_mk]``; ``labels [m]`` for the
    pair losses; ``keys [m*(2+k)]`` the texts' content keys (``batching.text_keys``), so that
    infonce never scores a query against a copy of its own positive or of itself. Every
    data-parallel rank passes the same ``m`` and ``k``.

    infonce   :func:`info_nce` of this rank's queries, candidates gathered over ``group``
              with gradient (rank losses average to the DP=1 loss of the concatenated batch).
    pairs     the pair loss of all ranks' pairs, gathered over ``group`` with gradient, so a
              batch-dependent loss (online_contrastive's hard-pair cuts) sees the whole batch;
              each rank computes the same value and DDP's gradient average gives DP=1's.
    Wrapped by :func:`matryoshka` when ``mrl_dims`` is given.
    """

    loss_type: str = "infonce"
    infonce: InfoNCEConfig | None = None
    margin: float = 0.5
    mrl_dims: tuple[int, ...] = ()

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown loss type {self.loss_type!r} ({', '.join(LOSS_TYPES)})")

    def __call__(self, emb: torch.Tensor, m: int, k: int, labels: torch.Tensor | None,
                 group: dist.ProcessGroup | None, keys: torch.Tensor | None = None) -> torch.Tensor:
        queries, docs = emb[:m], emb[m:2 * m]
        if self.loss_type == "infonce":
            if keys is not None:
                keys = keys.to(emb.device)
                keys = (keys[:m], keys[m:2 * m], keys[2 * m:].reshape(m, k))
            fn = partial(info_nce, cfg=self.infonce, group=group, keys=keys)
            args = (queries, docs, emb[2 * m:].reshape(m, k, emb.shape[-1]))
        else:
            margin = {} if self.loss_type == "cosine_similarity" else {"margin": self.margin}
            fn = partial(PAIR_LOSSES[self.loss_type], **margin)
            args = (all_gather_with_grad(queries, group), all_gather_with_grad(docs, group),
                    _all_gather(labels.to(emb.device), group))
        if self.mrl_dims:
            fn = matryoshka(fn, self.mrl_dims)
        return fn(*args)

    def of_batch(self, emb: torch.Tensor, batch, group: dist.ProcessGroup | None) -> torch.Tensor:
        """The loss of one ``batching.GroupBatch``'s embeddings (``step.plain_step``'s form)."""
        return self(emb, batch.m, batch.k, batch.labels, group, batch.keys)

    def negatives_per_query(self, groups: int, k: int) -> int:
        """Negatives each query is scored against when the loss sees ``groups`` groups (over
        all data-parallel ranks); 0 for the pair losses."""
        if self.loss_type != "infonce":
            return 0
        return (self.infonce or InfoNCEConfig()).negatives_per_query(groups, k)
