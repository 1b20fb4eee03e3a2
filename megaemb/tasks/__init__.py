"""Model task types (``--task_type``): what a task supplies to the shared loop (heads, losses,
batch rules, eval and export hooks). Not nanochat-style dataset tasks.

``TASKS`` maps each name to its ``base.Task``; ``get(name)`` looks one up."""
from __future__ import annotations

from megaemb.tasks.base import Task

EMBEDDING = Task(name="embedding",
                 losses=("infonce", "cosine_similarity", "contrastive", "online_contrastive"),
                 unsupported=("instruction",))  # the reranker prompt's; queries take --query_instruction
GENERATIVE_RERANKER = Task(
    name="generative_reranker", losses=("pointwise_reranker", "listwise_reranker"),
    head="megaemb.tasks.reranker:yes_no_head", output_layer=True, head_rows=2,
    train_data="megaemb.tasks.reranker:RerankTrainData", causal_lm=True,
    unsupported=("global_negatives", "max_tokens_per_micro_batch", "split_dataset_ratio",
                 "mrl_dims", "query_instruction"))
TASKS = {t.name: t for t in (EMBEDDING, GENERATIVE_RERANKER)}
DEFAULT = EMBEDDING.name


def get(name: str) -> Task:
    """The task called ``name``; ValueError (one line) naming the known ones otherwise."""
    if name not in TASKS:
        raise ValueError(f"--task_type {name!r}: expected one of "
                         f"{', '.join(repr(t) for t in TASKS)}")
    return TASKS[name]
