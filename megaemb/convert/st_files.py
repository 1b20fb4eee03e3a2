"""sentence-transformers package files for an exported Qwen3 embedder.

Pipeline: Transformer -> last-token Pooling -> Normalize, with Qwen3-Embedding's query prompt.
The tokenizer's post-processor is set to append ``<|endoftext|>`` so that transformers,
sentence-transformers and vLLM all pool the same token megaemb trained on.
"""
from __future__ import annotations

import json
import os

END_TOKEN = "<|endoftext|>"
DEFAULT_QUERY_PROMPT = ("Instruct: Given a web search query, retrieve relevant passages that answer "
                        "the query\nQuery:")


def _dump(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def write_st_files(out_dir: str, hidden_size: int, max_seq_length: int,
                   query_prompt: str = DEFAULT_QUERY_PROMPT) -> None:
    _dump(os.path.join(out_dir, "modules.json"), [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ])
    _dump(os.path.join(out_dir, "sentence_bert_config.json"),
          {"max_seq_length": max_seq_length, "do_lower_case": False})
    _dump(os.path.join(out_dir, "config_sentence_transformers.json"), {
        "prompts": {"query": query_prompt, "document": ""},
        "default_prompt_name": None, "similarity_fn_name": "cosine"})
    os.makedirs(os.path.join(out_dir, "1_Pooling"), exist_ok=True)
    _dump(os.path.join(out_dir, "1_Pooling", "config.json"), {
        "word_embedding_dimension": hidden_size, "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": True, "include_prompt": True})
    os.makedirs(os.path.join(out_dir, "2_Normalize"), exist_ok=True)


def append_end_token(out_dir: str) -> None:
    """Make ``tokenizer.json`` append ``<|endoftext|>`` to every sequence (as Qwen3-Embedding's)."""
    path = os.path.join(out_dir, "tokenizer.json")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        tok = json.load(f)
    end_id = next((t["id"] for t in tok.get("added_tokens", []) if t["content"] == END_TOKEN), None)
    if end_id is None:
        raise ValueError(f"{path}: tokenizer has no {END_TOKEN} token")
    tok["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": END_TOKEN, "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": END_TOKEN, "type_id": 0}},
                 {"Sequence": {"id": "B", "type_id": 1}}, {"SpecialToken": {"id": END_TOKEN, "type_id": 1}}],
        "special_tokens": {END_TOKEN: {"id": END_TOKEN, "ids": [end_id], "tokens": [END_TOKEN]}},
    }
    _dump(path, tok)
