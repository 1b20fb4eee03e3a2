"""The benchmark's training steps, as token ids, the same for every implementation measured.

A step holds ``m`` groups laid out as megaemb's training micro-batch is (``GroupBatch``):
``[q_1..q_m, p_1..p_m, n_11..n_1k, ..., n_m1..n_mk]``, each text a token-id list ending with
the pooled ``<|endoftext|>``.

    dense  every step: 8 (query, positive) pairs of 512 random tokens = 16 x 512 tokens
    mix    every step: ``groups`` debian-desc rows (query, positive, 3 hard negatives),
           tokenised with the real Qwen3 tokenizer, cut to ``max_length`` tokens; mean about
           70 tokens, so padded batches are mostly padding (the case packing is for)

A reranker's step (``reranker=True``) holds ``m`` lists, one per group, each its query's
prompts ``[prompt(q, p), prompt(q, n_1) .. prompt(q, n_k)]`` (the positive first): ``mix``
builds them as ``sft --task_type generative_reranker`` does (Qwen3-Reranker template,
``tasks.reranker_prompt``); ``dense`` reads its random texts as ``texts / 2`` lists of two.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megaemb.data.tokenize import EmbeddingTokenizer
from megaemb.tasks.reranker_prompt import RerankPromptTokenizer

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "debian-desc-train-2k.jsonl")


@dataclass
class Step:
    seqs: list[list[int]]  # m * (2 + k) texts in GroupBatch order
    m: int  # groups (queries)

    @property
    def lengths(self) -> list[int]:
        return [len(s) for s in self.seqs]


@dataclass
class Workload:
    name: str
    steps: list[Step]
    pad_id: int

    @property
    def groups_per_step(self) -> int:
        return self.steps[0].m


def dense(num_steps: int, *, texts: int = 16, length: int = 512, vocab: int = 151669,
          end_id: int = 151643, seed: int = 0) -> Workload:
    """``texts`` random sequences of ``length`` tokens per step (the last one the end token),
    read as ``texts / 2`` (query, positive) pairs."""
    g = torch.Generator().manual_seed(seed)
    steps = []
    for _ in range(num_steps):
        ids = torch.randint(0, vocab, (texts, length), generator=g)
        ids[:, -1] = end_id
        steps.append(Step(ids.tolist(), texts // 2))
    return Workload("dense", steps, end_id)


def mix(num_steps: int, tokenizer_dir: str, *, groups: int = 8, max_length: int = 512,
        path: str = DATA, seed: int = 0, reranker: bool = False) -> Workload:
    """``groups`` rows per step, drawn without replacement in a seeded order (the file must
    hold ``num_steps * groups`` rows); ``reranker``: as Qwen3-Reranker prompts (module
    docstring)."""
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    need = num_steps * groups
    if need > len(rows):
        raise ValueError(f"{path}: {num_steps} steps x {groups} groups need {need} rows, "
                         f"the file has {len(rows)}")
    random.Random(seed).shuffle(rows)
    tok = EmbeddingTokenizer(tokenizer_dir, max_length)
    if reranker:
        prompts = RerankPromptTokenizer(tok.tokenizer, max_length)
    steps = []
    for i in range(num_steps):
        chunk = rows[i * groups:(i + 1) * groups]
        if reranker:
            seqs = [ids for j, r in enumerate(chunk) for ids in prompts.encode_group(
                r["query"], [r["response"], *r["rejected_response"]], source=f"{path}[{j}]")]
        else:
            seqs = tok.encode([r["query"] for r in chunk] + [r["response"] for r in chunk]
                              + [n for r in chunk for n in r["rejected_response"]])
        steps.append(Step(seqs, groups))
    return Workload("mix", steps, tok.pad_id)


def info_nce(emb: torch.Tensor, m: int, temperature: float = 0.05) -> torch.Tensor:
    """emb ``[n, h]`` (L2-normalised, GroupBatch order) -> scalar loss: query ``i`` against
    every document of the step (``n - m`` columns), its positive at column ``i``."""
    logits = emb[:m] @ emb[m:].T / temperature
    return F.cross_entropy(logits, torch.arange(m, device=emb.device))


def listwise(scores: torch.Tensor, m: int) -> torch.Tensor:
    """A reranker's scores ``[n]`` -> scalar loss: the step's texts as ``m`` lists of ``n / m``
    prompts (the first of each the positive), cross-entropy over each list (as
    ``--loss_type listwise_reranker`` at temperature 1)."""
    lists = scores.float().view(m, -1)
    return F.cross_entropy(lists, torch.zeros(m, dtype=torch.long, device=scores.device))
