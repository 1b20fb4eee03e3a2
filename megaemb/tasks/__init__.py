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
_RERANKING = dict(  # what both rerankers share: losses, Qwen3-Reranker prompts, batches, hooks
    losses=("pointwise_reranker", "listwise_reranker", "listwise_distill_reranker"),
    train_data="megaemb.tasks.reranker:RerankTrainData",
    batch_unit="rows (a query with all the candidates it draws)",
    hf_files="megaemb.convert.st_files:cross_encoder_files",
    serve_routes=("/v1/rerank", "/rerank", "/v2/rerank"),
    serve_parser="megaemb.tasks.reranker_serve:rerank_parser",
    pair_scorer="megaemb.tasks.reranker:PairScorer",
    unsupported=(
        ("global_negatives", "a cross-encoder scores each (query, document) pair in a forward "
                             "pass of its own, so other queries' documents as negatives would be "
                             "new forward passes, not a gathered loss; raise MAX_NEGATIVE_SAMPLES "
                             "instead"),
        ("mrl_dims", "a reranker gives one score per pair, no embedding to truncate"),
        ("query_instruction", "the reranker prompt's instruction is --instruction")))
GENERATIVE_RERANKER = Task(name="generative_reranker", head="megaemb.tasks.reranker:yes_no_head",
                           output_layer="lm_head", head_rows=2, causal_lm=True,
                           **_RERANKING)
RERANKER = Task(name="reranker", head="megaemb.tasks.reranker:seq_cls_head",
                output_layer="score", head_rows=1, seq_cls=True, **_RERANKING)
TASKS = {t.name: t for t in (EMBEDDING, GENERATIVE_RERANKER, RERANKER)}
DEFAULT = EMBEDDING.name


def of_hf_config(config: dict, causal_lm_reranker: bool = False) -> Task:
    """The task an HF ``config.json`` is the export of: a ``seq_cls`` task's when its
    ``architectures`` name a ``*ForSequenceClassification``; a ``*ForCausalLM`` is the
    generative reranker's when ``causal_lm_reranker`` (the caller knows it is no embedder,
    ``preflight.model_task``), else the embedder's (``export`` lets ``--task_type`` say)."""
    architectures = config.get("architectures") or ()
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return next(t for t in TASKS.values() if t.seq_cls)
    if causal_lm_reranker and any(a.endswith("ForCausalLM") for a in architectures):
        return GENERATIVE_RERANKER
    return EMBEDDING


def get(name: str) -> Task:
    """The task called ``name``; ValueError (one line) naming the known ones otherwise."""
    if name not in TASKS:
        raise ValueError(f"--task_type {name!r}: expected one of "
                         f"{', '.join(repr(t) for t in TASKS)}")
    return TASKS[name]
