"""Model task types (``--task_type``): what a task supplies to the shared loop (heads, losses,
batch rules, eval and export hooks). Not nanochat-style dataset tasks.

``TASKS`` maps each name to its ``base.Task``; ``get(name)`` looks one up."""
from __future__ import annotations

from megaemb.tasks.base import Task

EMBEDDING = Task(
    name="embedding", losses=("infonce", "cosine_similarity", "contrastive", "online_contrastive"),
    batch_unit="groups (a query, its positive and negatives)",
    unsupported=(("instruction", "it is the reranker prompt's <Instruct>; embedder queries take "
                                 "--query_instruction"),))
GENERATIVE_RERANKER = Task(
    name="generative_reranker",
    losses=("pointwise_reranker", "listwise_reranker", "listwise_distill_reranker"),
    head="megaemb.tasks.reranker:yes_no_head", output_layer=True,
    train_data="megaemb.tasks.reranker:RerankTrainData", causal_lm=True,
    batch_unit="rows (a query with all the candidates it draws)",
    unsupported=(
        ("global_negatives", "a cross-encoder scores each (query, document) pair in a forward "
                             "pass of its own, so other queries' documents as negatives would be "
                             "new forward passes, not a gathered loss; raise MAX_NEGATIVE_SAMPLES "
                             "instead"),
        ("mrl_dims", "a reranker gives one score per pair, no embedding to truncate"),
        ("query_instruction", "the reranker prompt's instruction is --instruction")))
TASKS = {t.name: t for t in (EMBEDDING, GENERATIVE_RERANKER)}
DEFAULT = EMBEDDING.name


def get(name: str) -> Task:
    """The task called ``name``; ValueError (one line) naming the known ones otherwise."""
    if name not in TASKS:
        raise ValueError(f"--task_type {name!r}: expected one of "
                         f"{', '.join(repr(t) for t in TASKS)}")
    return TASKS[name]
