"""``megaemb serve`` of a generative reranker: POST /v1/rerank (also /rerank, /v2/rerank) in
the shape Cohere, Jina and vLLM share.

Request ``{"model"?, "query": str, "documents": [str | {"text": str}], "top_n"?: int >= 1,
"return_documents"?: bool (default true, as vLLM and Jina), "instruction"?: str}``;
``instruction`` (no standard rerank API has one; Qwen3-Reranker's prompt does) replaces the
server's ``--instruction``, itself Qwen3-Reranker's default instruction when not given.

Each document becomes one Qwen3-Reranker prompt (``reranker_prompt.RerankPromptTokenizer``:
the model card's template, a document too long for ``--max_length`` is cut at its end, never
the query nor the scored suffix; a query that leaves no room is a 400). The model's head gives
``l_yes - l_no`` per prompt (no vocabulary logits); ``relevance_score`` is the model card's
P(yes) = sigmoid(l_yes - l_no).

Answer ``{"id", "model", "results": [{"index", "relevance_score", "document"?: {"text"}}],
"usage": {"prompt_tokens", "total_tokens"}}``: results by descending score (ties: by index),
the first ``top_n``. Bad requests: ``serve.RequestError`` (OpenAI's error shape, ``param`` the
field).
"""
from __future__ import annotations

import uuid

import numpy as np

from megaemb.data.formats import DataError
from megaemb.serve import Job, RequestError, ServeConfig, is_int, check_text, read_request
from megaemb.tasks.reranker_prompt import RerankPromptTokenizer


def rerank_parser(hf_dir: str, cfg: ServeConfig, instruction: str | None = None):
    """The generative reranker's ``serve_parser``: ``parse(body) -> Job`` with prompts of at
    most ``cfg.max_length`` tokens (a ``--max_length`` too small for the template alone is a
    ValueError)."""
    from transformers import AutoTokenizer

    prompts = RerankPromptTokenizer(AutoTokenizer.from_pretrained(hf_dir), cfg.max_length,
                                    instruction)
    return lambda body: parse_rerank(body, cfg, prompts)


def _documents(req: dict, cfg: ServeConfig) -> list[str]:
    """``documents``: a non-empty list of non-blank strings or ``{"text": str}`` objects."""
    if "documents" not in req:
        raise RequestError(400, "'documents' is required", "documents")
    docs = req["documents"]
    if not isinstance(docs, list) or not docs:
        raise RequestError(400, "'documents' must be a non-empty list of strings or {\"text\": "
                           "string} objects", "documents")
    if len(docs) > cfg.max_batch_size:
        raise RequestError(400, f"'documents' has {len(docs)} items; at most {cfg.max_batch_size} "
                           "per request", "documents")
    texts = []
    for i, doc in enumerate(docs):
        text = doc.get("text") if isinstance(doc, dict) else doc
        if not isinstance(text, str):
            raise RequestError(400, f"documents[{i}] must be a string or a {{\"text\": string}} "
                               f"object, got {type(doc).__name__}"
                               + (" without a string 'text'" if isinstance(doc, dict) else ""),
                               "documents")
        check_text(text, f"documents[{i}]", "documents")
        texts.append(text)
    return texts


def _optional_text(req: dict, name: str) -> str | None:
    value = req.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise RequestError(400, f"'{name}' must be a string, got {type(value).__name__}", name)
    check_text(value, f"'{name}'", name)
    return value


def parse_rerank(body: bytes, cfg: ServeConfig, prompts: RerankPromptTokenizer) -> Job:
    """A POST /v1/rerank body -> ``Job`` of one prompt per document; ``RequestError`` for
    every bad request class."""
    req = read_request(body, cfg)
    if "query" not in req:
        raise RequestError(400, "'query' is required", "query")
    query = req["query"]
    if not isinstance(query, str):
        raise RequestError(400, f"'query' must be a string, got {type(query).__name__}", "query")
    check_text(query, "'query'", "query")
    docs = _documents(req, cfg)
    top_n = req.get("top_n")
    if top_n is not None and (not is_int(top_n) or top_n < 1):
        raise RequestError(400, f"'top_n' must be an integer >= 1, got {top_n!r}", "top_n")
    keep_docs = req.get("return_documents", True)
    if not isinstance(keep_docs, bool):
        raise RequestError(400, f"'return_documents' must be true or false, got {keep_docs!r}",
                           "return_documents")
    instruction = _optional_text(req, "instruction")
    try:
        seqs = prompts.encode_group(query, docs, source="request", instruction=instruction)
    except DataError as e:  # the query (and template) alone fill --max_length
        raise RequestError(400, str(e), "query", "context_length_exceeded") from None

    def reply(scores: np.ndarray) -> dict:
        """``scores [n]`` (``l_yes - l_no`` per document) -> the rerank answer."""
        probs = 1.0 / (1.0 + np.exp(-scores.astype(np.float64)))
        order = sorted(range(len(docs)), key=lambda i: (-scores[i], i))[:top_n]
        results = [{"index": i, "relevance_score": float(probs[i]),
                    **({"document": {"text": docs[i]}} if keep_docs else {})} for i in order]
        tokens = sum(len(s) for s in seqs)
        return {"id": f"rerank-{uuid.uuid4().hex}", "model": cfg.name, "results": results,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
    return Job(seqs, reply)
