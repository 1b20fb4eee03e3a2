"""Reranker training files -> validated rows -> groups of scored candidates (ms-swift's formats).

With ``reranker_prompt`` / ``reranker_loss`` the data and loss side of ``--task_type
generative_reranker`` (read by ``tasks.reranker.RerankTrainData``).

Row formats (extra fields are ignored; files and ``#N`` specs as in ``data/formats.py``):

    group rows         {"query": str, "response": str, "rejected_response": [str, ...]}
                       {"messages": [...], "positive_messages": [[...], ...],
                        "negative_messages": [[...], ...]}
                       every positive (all of positive_messages) and every negative is a
                       candidate; a row needs at least one of each. A message list's text is
                       read as ``data/formats.py`` reads it; a system message in ``messages``
                       is the row's instruction (as ms-swift; it replaces ``--instruction``).
    labelled pairs     {"query": str, "response": str, "label": 0 | 1} (or the messages form
                       with a label): one candidate; ``pointwise_reranker`` only, which also
                       takes group rows in the same files (the log counts each kind); a
                       labelled row with negatives is a bad row (they would be dropped).
    teacher scores     with ``teacher=True`` (``--loss_type listwise_distill_reranker``) every
                       group row carries ``"scores": [number, ...]``, one per candidate,
                       positives first then negatives (for the KL loss); a row without them
                       is a bad row (``file:line``, field 'scores'). Other losses ignore them.

Sampling, as ms-swift's ``Template._reranker_data_collator`` (swift/template/base.py): each
time a row is used, up to ``MAX_POSITIVE_SAMPLES`` (1) of its positives are drawn at random
without replacement, and for each of them up to ``MAX_NEGATIVE_SAMPLES`` (7) negatives, so a
row gives ``min(P, MAX_POSITIVE_SAMPLES)`` groups ``[positive, negatives...]`` (labels
``[1, 0, ...]``; each drawn candidate keeps its teacher score) that must share a micro-batch.
ms-swift's listwise loss silently drops a group smaller than
``LISTWISE_RERANKER_MIN_GROUP_SIZE`` (2); here such a row is a ``file:line`` error for the
listwise losses, so no row trains nothing unnoticed.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from megaemb.data.formats import (BAD_LABEL, MISSING_FIELD, NO_NEGATIVES, NOT_OBJECT,
                                  WRONG_FORMAT, WRONG_TYPE, BadRow, RowReport, _field, _json_type,
                                  _label, _list, _message_text, _negatives, _require, _text,
                                  is_labelled, load_parsed)
from megaemb.loss import _parse_int, config_from_env

LISTWISE_LOSSES = ("listwise_reranker", "listwise_distill_reranker")
DISTILL_LOSS = "listwise_distill_reranker"  # KL to the rows' teacher scores
RERANK_LOSSES = ("pointwise_reranker", *LISTWISE_LOSSES)
NO_POSITIVE = "no positive"
GROUP_TOO_SMALL = "group too small"


@dataclass(frozen=True)
class RerankSampling:
    """How many candidates of a row one use of it draws (ms-swift's variables beside).

    max_positive   MAX_POSITIVE_SAMPLES   groups per row (one per drawn positive), >= 1
    max_negative   MAX_NEGATIVE_SAMPLES   negatives per group, >= 0
    """

    max_positive: int = 1
    max_negative: int = 7

    def __post_init__(self):
        if self.max_positive < 1:
            raise ValueError(f"MAX_POSITIVE_SAMPLES must be >= 1, got {self.max_positive}")
        if self.max_negative < 0:
            raise ValueError(f"MAX_NEGATIVE_SAMPLES must be >= 0, got {self.max_negative}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ, **overrides) -> RerankSampling:
        """Defaults, then MAX_POSITIVE_SAMPLES / MAX_NEGATIVE_SAMPLES, then ``overrides``."""
        return config_from_env(cls, _SAMPLING_ENV, overrides, env)


_SAMPLING_ENV = {"max_positive": ("MAX_POSITIVE_SAMPLES", _parse_int),
                 "max_negative": ("MAX_NEGATIVE_SAMPLES", _parse_int)}


@dataclass
class RerankRow:
    """One validated row. ``teacher`` holds one score per candidate (positives first) or None;
    ``instruction`` is the row's own (None: ``--instruction`` or the default)."""

    query: str
    positives: list[str]
    negatives: list[str]
    teacher: list[float] | None
    instruction: str | None
    source: str           # "file:line"
    query_field: str      # the field the query came from, for errors about it


@dataclass
class RerankGroup:
    """Candidates scored together: a positive then its negatives (one candidate for a labelled
    pair). ``labels`` are 1.0 / 0.0; ``teacher`` is None or one score per document."""

    query: str
    documents: list[str]
    labels: list[float]
    teacher: list[float] | None
    instruction: str | None
    source: str
    query_field: str


# ------------------------------------------------------------------------------ rows

def _instruction(messages: list) -> str | None:
    """The content of the system message of a query's message list, if it has one."""
    for i, message in enumerate(messages):
        if isinstance(message, dict) and message.get("role") == "system":
            return _text(_require(message, "content", f"messages[{i}].content"),
                         f"messages[{i}].content")
    return None


def _candidate_text(value: Any, name: str) -> str:
    """A candidate's message list -> its text; a system message of its own is refused (ms-swift
    would use it as this candidate's instruction, which megaemb does not support)."""
    if isinstance(value, (list, tuple)) and any(
            isinstance(m, dict) and m.get("role") == "system" for m in value):
        raise _field(name, "a system message per candidate is not supported; put the "
                     "instruction in 'messages' or use --instruction", WRONG_FORMAT)
    return _message_text(value, name)


def _query(row: dict) -> tuple[str, str, str | None]:
    """-> ``(query, the field it came from, the row's instruction or None)``."""
    if "messages" in row:
        messages = _list(_require(row, "messages"), "messages")
        return _message_text(messages, "messages"), "messages", _instruction(messages)
    return _text(_require(row, "query"), "query"), "query", None


def _positives(row: dict) -> list[str]:
    """Every positive of the row (at least one)."""
    if "messages" not in row:
        return [_text(_require(row, "response"), "response")]
    items = _list(_require(row, "positive_messages"), "positive_messages")
    if not items:
        raise _field("positive_messages", "empty list: a row needs a positive", NO_POSITIVE)
    return [_candidate_text(p, f"positive_messages[{i}]") for i, p in enumerate(items)]


def _negatives_field(row: dict) -> str:
    return "negative_messages" if "messages" in row else "rejected_response"


def _group_negatives(row: dict) -> list[str]:
    """The negatives of a group row: a list field with at least one item."""
    name = _negatives_field(row)
    negatives = _negatives(row, name, False, _candidate_text if "messages" in row else _text)
    if not negatives:
        raise _field(name, "missing or empty: a group needs at least one negative", NO_NEGATIVES)
    return negatives


def _teacher(row: dict, count: int) -> list[float]:
    """The ``scores`` field: ``count`` finite numbers."""
    if row.get("scores") is None:
        raise _field("scores", f"missing: {DISTILL_LOSS} needs a teacher score per candidate "
                     "on every row", MISSING_FIELD)
    scores = _list(row["scores"], "scores")
    if len(scores) != count:
        raise _field("scores", f"{len(scores)} scores for {count} candidates (positives then "
                     "negatives)", WRONG_FORMAT)
    for i, score in enumerate(scores):
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            raise _field(f"scores[{i}]", f"expected number, got {_json_type(score)}", WRONG_TYPE)
        if not math.isfinite(score):
            raise _field(f"scores[{i}]", f"{score} is not finite", BAD_LABEL)
    return [float(s) for s in scores]


def parse_row(row: Any, source: str, loss_type: str, *, min_group_size: int = 2,
              teacher: bool = False) -> RerankRow:
    """One parsed file row -> ``RerankRow``, or ``BadRow`` naming the field. A labelled pair's
    one candidate (its first positive) is a positive (label 1) or a negative (0); listwise
    rows must give groups of at least ``min_group_size`` candidates."""
    if not isinstance(row, dict):
        raise BadRow(NOT_OBJECT, f"expected a JSON object, got {_json_type(row)}")
    labelled = is_labelled(row)
    if labelled and loss_type != "pointwise_reranker":
        raise _field("label", f"{row['label']!r}: labelled pairs have no group to rank; "
                     f"{loss_type} needs group rows (positives and negatives)", WRONG_FORMAT)
    label = _label(row, loss_type) if labelled else None
    query, query_field, instruction = _query(row)
    positives = _positives(row)
    if labelled:
        if row.get(_negatives_field(row)):
            raise _field("label", f"{row['label']!r} on a row with '{_negatives_field(row)}': a "
                         "labelled pair is one candidate, its negatives would be dropped (drop "
                         "'label' to train the row as a group)", WRONG_FORMAT)
        positives, negatives = (positives[:1], []) if label == 1 else ([], positives[:1])
        return RerankRow(query, positives, negatives, None, instruction, source, query_field)
    negatives = _group_negatives(row)
    if loss_type in LISTWISE_LOSSES and 1 + len(negatives) < min_group_size:
        raise _field(_negatives_field(row), f"{len(negatives)} negative(s) make groups of "
                     f"{1 + len(negatives)} < LISTWISE_RERANKER_MIN_GROUP_SIZE={min_group_size}",
                     GROUP_TOO_SMALL)
    scores = _teacher(row, len(positives) + len(negatives)) if teacher else None
    return RerankRow(query, positives, negatives, scores, instruction, source, query_field)


def load_rerank_rows(specs: list[str], loss_type: str, *, min_group_size: int = 2,
                     sampling: RerankSampling = RerankSampling(), teacher: bool = False,
                     bad_rows: str = "error", seed: int = 42) -> tuple[list[RerankRow], RowReport]:
    """Read and validate every spec (``#N`` sampling, ``bad_rows`` policy and errors as
    ``data/formats.load_examples``). ``teacher``: rows must carry ``scores`` (listwise only).
    A setting that makes every listwise group too small raises ValueError."""
    if loss_type not in RERANK_LOSSES:
        raise ValueError(f"loss_type must be one of {RERANK_LOSSES}, got {loss_type!r}")
    if teacher and loss_type not in LISTWISE_LOSSES:
        raise ValueError("teacher scores are for the listwise losses, not pointwise_reranker")
    if loss_type in LISTWISE_LOSSES and 1 + sampling.max_negative < min_group_size:
        raise ValueError(f"MAX_NEGATIVE_SAMPLES={sampling.max_negative} gives groups of "
                         f"{1 + sampling.max_negative} < LISTWISE_RERANKER_MIN_GROUP_SIZE="
                         f"{min_group_size}")

    def parse(row: Any, source: str) -> RerankRow:
        return parse_row(row, source, loss_type, min_group_size=min_group_size, teacher=teacher)

    return load_parsed(specs, parse, bad_rows, seed)


# -------------------------------------------------------------------------- sampling

def sample_groups(row: RerankRow, sampling: RerankSampling,
                  rng: np.random.Generator) -> list[RerankGroup]:
    """One use of ``row``: ``min(P, max_positive)`` groups, each a positive drawn without
    replacement and ``min(N, max_negative)`` of its negatives drawn without replacement (a new
    draw per group), as ms-swift's collator. A labelled pair is one group of its candidate."""
    candidates = row.positives + row.negatives
    if not row.positives or not row.negatives:  # a labelled pair (group rows have both)
        return [_group(row, candidates, [0], [float(bool(row.positives))])]
    P, N = len(row.positives), len(row.negatives)
    groups = []
    for i in rng.choice(P, min(P, sampling.max_positive), replace=False):
        negatives = rng.choice(N, min(N, sampling.max_negative), replace=False)
        picks = [int(i)] + [P + int(j) for j in negatives]
        groups.append(_group(row, candidates, picks, [1.0] + [0.0] * len(negatives)))
    return groups


def _group(row: RerankRow, candidates: list[str], picks: list[int],
           labels: list[float]) -> RerankGroup:
    teacher = None if row.teacher is None else [row.teacher[k] for k in picks]
    return RerankGroup(row.query, [candidates[k] for k in picks], labels, teacher,
                       row.instruction, row.source, row.query_field)
