"""Reranker losses: pure functions of one score per candidate and the group layout.

``tasks.reranker.RerankTrainData`` trains with them: ``--loss_type pointwise_reranker``,
``listwise_reranker`` and ``listwise_distill_reranker`` (the KL loss).

Layout: ``scores [n]`` (fp32, e.g. the generative head's ``l_yes - l_no`` or a classification
head's logit), candidates of a group consecutive, ``sizes`` the group lengths (summing to
``n``), the positive first in each listwise group, as ms-swift's collator lays them out
(``Template._reranker_data_collator`` in swift/template/base.py) and
``reranker_data.sample_groups`` returns them.

    pointwise_loss     ms-swift ``pointwise_reranker`` (swift/loss/reranker.py,
                       ``PointwiseRerankerLoss``): BCE-with-logits of each score against its
                       0/1 label, mean over candidates. On ``l_yes - l_no`` this is the
                       two-way cross-entropy over ``[l_no, l_yes]``.
    listwise_loss      ms-swift ``listwise_reranker`` (``ListwiseRerankerLoss``): per group,
                       cross-entropy of ``scores / temperature`` with the positive as target;
                       groups smaller than ``min_group_size`` are left out; mean over the
                       groups kept (0 when none is).
    listwise_kl_loss   beyond ms-swift, for distillation (Tevatron's and sentence-transformers'
                       ``DistillKLDivLoss`` form): per group, KL(softmax(teacher /
                       teacher_temperature) || softmax(scores / temperature)); the same group
                       filter and mean.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megaemb.loss import _parse_float, _parse_int, config_from_env


@dataclass(frozen=True)
class ListwiseConfig:
    """Listwise settings; the environment variable of each beside it.

    temperature           LISTWISE_RERANKER_TEMPERATURE          student scores / this (1.0)
    min_group_size        LISTWISE_RERANKER_MIN_GROUP_SIZE       smaller groups add no loss (2)
    teacher_temperature   LISTWISE_RERANKER_TEACHER_TEMPERATURE  teacher scores / this (1.0;
                          megaemb's, ms-swift has no distillation)
    """

    temperature: float = 1.0
    min_group_size: int = 2
    teacher_temperature: float = 1.0

    def __post_init__(self):
        for name, var in (("temperature", "LISTWISE_RERANKER_TEMPERATURE"),
                          ("teacher_temperature", "LISTWISE_RERANKER_TEACHER_TEMPERATURE")):
            if not getattr(self, name) > 0:
                raise ValueError(f"{var} must be > 0, got {getattr(self, name)}")
        if self.min_group_size < 1:
            raise ValueError(f"LISTWISE_RERANKER_MIN_GROUP_SIZE must be >= 1, "
                             f"got {self.min_group_size}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ, **overrides) -> ListwiseConfig:
        """Defaults, then the LISTWISE_RERANKER_* variables, then ``overrides`` not None."""
        return config_from_env(cls, _ENV, overrides, env)


_ENV = {"temperature": ("LISTWISE_RERANKER_TEMPERATURE", _parse_float),
        "min_group_size": ("LISTWISE_RERANKER_MIN_GROUP_SIZE", _parse_int),
        "teacher_temperature": ("LISTWISE_RERANKER_TEACHER_TEMPERATURE", _parse_float)}


def pointwise_loss(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy of ``sigmoid(scores [n])`` against ``labels [n]`` (0 / 1)."""
    if scores.dim() != 1 or labels.shape != scores.shape:
        raise ValueError(f"scores and labels must both be [n], got {tuple(scores.shape)} and "
                         f"{tuple(labels.shape)}")
    return F.binary_cross_entropy_with_logits(scores, labels.to(scores.dtype))


def _grouped(values: torch.Tensor, sizes: Sequence[int], fill: float
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``values [n]`` -> ``[G, max(sizes)]`` with group ``g`` in row ``g`` from column 0 and
    ``fill`` after it, and the mask of the real entries."""
    if values.dim() != 1 or sum(sizes) != values.shape[0] or min(sizes, default=1) < 1:
        raise ValueError(f"sizes {list(sizes)} must be >= 1 each and sum to the "
                         f"{values.shape[0]} scores")
    lengths = torch.as_tensor(sizes, device=values.device)
    mask = torch.arange(int(lengths.max()), device=values.device) < lengths[:, None]
    return values.new_full(mask.shape, fill).masked_scatter(mask, values), mask


def _kept(sizes: Sequence[int], min_group_size: int, device) -> torch.Tensor:
    return torch.as_tensor(sizes, device=device) >= min_group_size


def _mean_over(per_group: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Mean of ``per_group`` over the ``kept`` groups; 0 (still a function of the scores, so a
    backward reaches every parameter) when none is kept."""
    return (per_group * kept).sum() / kept.sum().clamp(min=1)


def listwise_loss(scores: torch.Tensor, sizes: Sequence[int], temperature: float = 1.0,
                  min_group_size: int = 2) -> torch.Tensor:
    """Mean over groups of ``-log softmax(scores_g / temperature)[0]`` (the positive is each
    group's first candidate)."""
    logits = _grouped(scores / temperature, sizes, float("-inf"))[0]
    per_group = torch.logsumexp(logits, dim=1) - logits[:, 0]
    return _mean_over(per_group, _kept(sizes, min_group_size, scores.device))


def listwise_kl_loss(scores: torch.Tensor, teacher: torch.Tensor, sizes: Sequence[int],
                     temperature: float = 1.0, teacher_temperature: float = 1.0,
                     min_group_size: int = 2) -> torch.Tensor:
    """Mean over groups of KL(softmax(teacher_g / teacher_temperature) ||
    softmax(scores_g / temperature)); no gradient flows to ``teacher``."""
    if teacher.shape != scores.shape:
        raise ValueError(f"teacher scores must be [n] like the scores, got {tuple(teacher.shape)} "
                         f"and {tuple(scores.shape)}")
    student, mask = _grouped(scores / temperature, sizes, float("-inf"))
    target = _grouped(teacher.detach().to(scores.dtype) / teacher_temperature, sizes,
                      float("-inf"))[0]
    student, target = torch.log_softmax(student, dim=1), torch.log_softmax(target, dim=1)
    per_group = torch.where(mask, target.exp() * (target - student), 0.0).sum(dim=1)
    return _mean_over(per_group, _kept(sizes, min_group_size, scores.device))
