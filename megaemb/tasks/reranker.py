"""``--task_type generative_reranker``: Qwen3-Reranker trained on megatron-core, and
``--task_type reranker``: its sequence-classification form (HF ``Qwen3ForSequenceClassification``).

The tasks' parts (``megaemb.tasks.GENERATIVE_RERANKER``, ``megaemb.tasks.RERANKER``):

head        ``yes_no_head``: ``model.heads.YesNoHead`` scoring ``l_yes - l_no`` at each
            prompt's last token from two rows of the output layer (no vocabulary logits);
            ``seq_cls_head``: ``model.heads.SeqClsHead``, one logit ``h_last . w`` from the
            one-row classifier ``score.weight`` (see ``convert.reranker`` for its first value).
            Everything below is shared: ms-swift picks the prompt template by model, not by
            task type, so both score Qwen3-Reranker's prompt at its last token.
train data  ``RerankTrainData``: group rows (``reranker_data``) tokenised once into
            Qwen3-Reranker prompts (``reranker_prompt``; a query too long is a ``file:line``
            error before training starts); each step draws every row's groups anew with a
            generator seeded by (``--seed``, step, row), so every parallel layout draws the
            same ones. ``--micro_batch_size`` rows form a micro-batch, with all their groups,
            or under ``--max_tokens_per_micro_batch`` the most rows that fit the budget on
            every data-parallel rank (``step.plain_micro_batch_size``, a collective): a
            query's candidates never leave their micro-batch nor their data-parallel rank
            (packed: one ``[1, T]`` pack holds whole groups). ``--split_dataset_ratio`` holds
            rows out for eval as the embedding token store does (``split_positions``).
loss        ``pointwise_reranker`` (BCE per candidate), ``listwise_reranker`` (CE per group,
            ``LISTWISE_RERANKER_*``) or ``listwise_distill_reranker`` (KL to the rows' teacher
            ``scores``, which each drawn candidate carries along), from ``reranker_loss``,
            weighted by the step's global
            count (candidates, or groups kept) over all data-parallel ranks: a micro-batch's
            loss is ``sum of its terms * micro-batches * DP / global count``, which megatron's
            schedule (``/ micro-batches``) and DDP's average (``/ DP``) turn into the mean over
            the whole global batch, so any DP size and micro-batch split give DP=1's gradient.
eval        ``--val_dataset`` group rows: within-group MRR@10 / nDCG@10 and accuracy
            (``evaluate.rerank_metrics``) of every candidate's score; ``eval --retriever``
            scores a retriever's top-k with ``PairScorer``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.distributed as dist

from megaemb import platform
from megaemb.data.batching import TextBatch
from megaemb.data.formats import DataError
from megaemb.data.sampler import micro_batches
from megaemb.data.token_store import split_positions
from megaemb.tasks.reranker_data import (DISTILL_LOSS, RerankGroup, RerankRow, RerankSampling,
                                         load_rerank_rows, sample_groups)
from megaemb.tasks.reranker_loss import (ListwiseConfig, listwise_kl_loss, listwise_loss,
                                         pointwise_loss)
from megaemb.tasks.reranker_prompt import QUERY_TOO_LONG, RerankPromptTokenizer, score_token_ids


def yes_no_head(tokenizer_dir: str, shape, config):
    """The generative reranker's head: token ids from ``GENERATIVE_RERANKER_POSITIVE_TOKEN`` /
    ``_NEGATIVE_TOKEN`` ("yes" / "no") in the model's tokenizer."""
    from transformers import AutoTokenizer

    from megaemb.model.heads import YesNoHead

    yes, no = score_token_ids(AutoTokenizer.from_pretrained(tokenizer_dir))
    return YesNoHead(yes, no, vocab_size=shape.vocab_size,
                     sequence_parallel=config.sequence_parallel)


def seq_cls_head(tokenizer_dir: str, shape, config):
    """The sequence-classification reranker's head (reads the model's ``score_layer``)."""
    from megaemb.model.heads import SeqClsHead

    return SeqClsHead(sequence_parallel=config.sequence_parallel)


@dataclass
class RerankBatch:
    """One micro-batch: its prompts (``texts``, candidates of a group consecutive), ``labels
    [n]`` (1 / 0), the groups' ``sizes`` and, for ``listwise_distill_reranker``, ``teacher
    [n]`` (each candidate's teacher score; else None)."""

    texts: TextBatch
    labels: torch.Tensor
    sizes: list[int]
    teacher: torch.Tensor | None = None


EVAL_BATCH_TEXTS = 32  # prompts per forward micro-batch of the in-loop eval


class RerankTrainData:
    """Rows of ``--dataset`` as token ids, per-step micro-batches and the step's loss."""

    def __init__(self, cfg, tokenizer, log):
        self.loss_type = cfg.loss_type
        self.seed = cfg.seed
        self.listwise = ListwiseConfig.from_env()
        self.sampling = RerankSampling.from_env()
        rows, report = load_rerank_rows(cfg.dataset, cfg.loss_type,
                                        min_group_size=self.listwise.min_group_size,
                                        sampling=self.sampling, bad_rows=cfg.bad_rows,
                                        seed=cfg.seed, teacher=cfg.loss_type == DISTILL_LOSS)
        prompts = RerankPromptTokenizer(tokenizer, cfg.max_length, cfg.instruction or None)
        rows = _tokenized_rows(rows, prompts, cfg.bad_rows, report, cfg.dataset)
        log(f"train data: {report.summary()}")
        for msg in report.messages:
            log(f"  skipped: {msg}")
        pairs = sum(not (row.positives and row.negatives) for row in rows)
        log(f"tokenized {len(rows)} reranker rows ({len(rows) - pairs} group rows, {pairs} "
            f"labelled pairs); {prompts.truncated} documents truncated to fit --max_length "
            f"{cfg.max_length}")
        train, held = split_positions(len(rows), cfg.split_dataset_ratio, cfg.seed)
        if not len(train):
            raise DataError(f"{', '.join(cfg.dataset)}: {len(rows)} row(s), all held out by "
                            f"--split_dataset_ratio {cfg.split_dataset_ratio}; none is left to "
                            "train on")
        self.rows = [rows[i] for i in train]
        if cfg.val_dataset:
            self.eval_rows = self._eval_rows(cfg, prompts, log)
        else:  # --split_dataset_ratio's rows, in split order (none without it)
            held = held[:cfg.eval_limit] if cfg.eval_limit else held
            self.eval_rows = [rows[i] for i in held]
            if len(held):
                log(f"eval data: {len(held)} rows held out of --dataset "
                    f"(--split_dataset_ratio {cfg.split_dataset_ratio})")

    def _eval_rows(self, cfg, prompts: RerankPromptTokenizer, log) -> list[RerankRow]:
        """``--val_dataset`` rows (the first ``--eval_limit``), every candidate tokenised."""
        rows, report = load_rerank_rows(cfg.val_dataset, cfg.loss_type,
                                        min_group_size=self.listwise.min_group_size,
                                        sampling=self.sampling, bad_rows=cfg.bad_rows,
                                        seed=cfg.seed)
        rows = rows[:cfg.eval_limit] if cfg.eval_limit else rows
        rows = _tokenized_rows(rows, prompts, cfg.bad_rows, report, cfg.val_dataset)
        log(f"eval data: {report.summary()}")
        return rows

    def evaluate(self, model, layout) -> dict:
        """Collective over the model's ranks: ``evaluate.rerank_metrics`` of every candidate
        of every eval row (all of them, no sampling), the same on every rank."""
        from megaemb.evaluate import rerank_metrics
        from megaemb.inference import forward_embeddings

        seqs = [ids for row in self.eval_rows for ids in row.positives + row.negatives]
        scores = forward_embeddings(model, seqs, pad_id=layout.pad_id, packed=layout.packed,
                                    micro_batch_size=EVAL_BATCH_TEXTS).cpu().numpy()
        sizes = [len(row.positives) + len(row.negatives) for row in self.eval_rows]
        labels = [np.r_[np.ones(len(row.positives)), np.zeros(len(row.negatives))]
                  for row in self.eval_rows]
        return rerank_metrics(np.split(scores, np.cumsum(sizes)[:-1]), labels)

    def __len__(self) -> int:
        return len(self.rows)

    def draw(self, indices: list[int], step: int) -> list[list[RerankGroup]]:
        """Rows ``indices`` of step ``step`` -> each row's groups (candidates as token ids),
        drawn by a generator seeded by (``--seed``, step, row): every rank and layout draws
        the same. No collective."""
        return [sample_groups(self.rows[i], self.sampling,
                              np.random.default_rng([self.seed, step, i])) for i in indices]

    @staticmethod
    def texts(drawn: list[list[RerankGroup]]) -> list[list]:
        """Each drawn row's prompts (token ids): what it puts into its micro-batch."""
        return [[d for g in groups for d in g.documents] for groups in drawn]

    def micro_batches(self, drawn: list[list[RerankGroup]], micro_batch_size: int,
                      layout) -> list[RerankBatch]:
        """This rank's drawn rows -> micro-batches of ``micro_batch_size`` rows, each with all
        the groups its rows draw."""
        return [self._batch([g for groups in chunk for g in groups], layout)
                for chunk in micro_batches(drawn, micro_batch_size)]

    def _batch(self, groups: list[RerankGroup], layout) -> RerankBatch:
        teacher = (torch.tensor([t for g in groups for t in g.teacher], dtype=torch.float32)
                   if self.loss_type == DISTILL_LOSS else None)
        return RerankBatch(layout.batch([d for g in groups for d in g.documents]),
                           torch.tensor([x for g in groups for x in g.labels]),
                           [len(g.documents) for g in groups], teacher)

    def _terms(self, sizes: list[int]) -> int:
        """How many terms a micro-batch's loss sums: candidates (pointwise) or kept groups."""
        if self.loss_type == "pointwise_reranker":
            return sum(sizes)
        return sum(s >= self.listwise.min_group_size for s in sizes)

    def _sum(self, scores: torch.Tensor, batch: RerankBatch) -> torch.Tensor:
        """The sum of the micro-batch's loss terms."""
        terms = self._terms(batch.sizes)
        if self.loss_type == "pointwise_reranker":
            return pointwise_loss(scores, batch.labels.to(scores.device)) * terms
        if self.loss_type == DISTILL_LOSS:
            return listwise_kl_loss(scores, batch.teacher.to(scores.device), batch.sizes,
                                    self.listwise.temperature, self.listwise.teacher_temperature,
                                    self.listwise.min_group_size) * terms
        return listwise_loss(scores, batch.sizes, self.listwise.temperature,
                             self.listwise.min_group_size) * terms

    def step_loss(self, micro: list[RerankBatch], group: dist.ProcessGroup):
        """Collective over ``group`` (data parallel): the step's loss function
        ``(scores, batch, group) -> loss`` (see the module docstring's weighting)."""
        total = torch.tensor([float(sum(self._terms(b.sizes) for b in micro))],
                             device=platform.device())
        dist.all_reduce(total, group=group)
        scale = len(micro) * dist.get_world_size(group) / max(float(total), 1.0)

        def loss(scores: torch.Tensor, batch: RerankBatch, group) -> torch.Tensor:
            return self._sum(scores, batch) * scale
        return loss


class PairScorer:
    """``eval --retriever``'s scores of (query, candidate) pairs: each pair's Qwen3-Reranker
    prompt (``reranker_prompt``; ``instruction`` replaces the default one, documents cut to
    ``max_length``) through the model's head, ``l_yes - l_no``."""

    def __init__(self, model, tokenizer_dir: str, max_length: int, instruction: str | None):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        self.model = model
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.prompts = RerankPromptTokenizer(tokenizer, max_length, instruction)

    def score(self, queries: list[str], candidates: list[list[str]], *, source: str,
              batch_size: int = 32, packed: bool | None = None) -> np.ndarray | None:
        """Collective over all ranks: ``candidates[i]`` (``k`` documents each) scored against
        ``queries[i]`` -> ``[nq, k]`` fp32 on global rank 0, None elsewhere; pairs are split
        over data-parallel replicas (``embed.forward_split``). Every rank tokenises every
        pair, so a query that leaves no room for a document is the same ``DataError`` (naming
        ``source`` and the query's number, from 1) on all ranks, before any collective."""
        from megaemb.embed import forward_split

        k = len(candidates[0]) if candidates else 0
        pairs = [ids for i, (query, docs) in enumerate(zip(queries, candidates))
                 for ids in self.prompts.encode_group(query, docs, source=f"{source}: query {i + 1}")]
        scores = forward_split(self.model, len(pairs), lambda mine: [pairs[i] for i in mine], pad_id=self.pad_id,
                               batch_size=batch_size, packed=packed)
        return None if scores is None else scores.reshape(len(queries), k)


def _tokenized(row: RerankRow, prompts: RerankPromptTokenizer) -> RerankRow:
    """``row`` with each candidate replaced by its whole prompt's token ids."""
    ids = prompts.encode_group(row.query, row.positives + row.negatives, source=row.source,
                               query_field=row.query_field, instruction=row.instruction)
    return replace(row, positives=ids[:len(row.positives)], negatives=ids[len(row.positives):])


def _tokenized_rows(rows: list[RerankRow], prompts: RerankPromptTokenizer, bad_rows: str,
                    report, specs: list[str]) -> list[RerankRow]:
    """Every row ``_tokenized``. A row whose query leaves no room for a document raises its
    ``DataError`` (``file:line``), or with ``bad_rows="skip"`` is counted in ``report`` and
    dropped; none left is a ``DataError``."""
    kept = []
    for row in rows:
        try:
            kept.append(_tokenized(row, prompts))
        except DataError as error:
            if bad_rows == "error" or error.reason != QUERY_TOO_LONG:
                raise
            report.add_skip(error)
    if not kept:
        raise DataError(f"{', '.join(specs)}: no valid rows ({report.summary()}; every query "
                        f"is too long for --max_length {prompts.max_length})")
    return kept
