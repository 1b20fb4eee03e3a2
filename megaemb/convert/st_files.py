"""sentence-transformers package files for an exported model: each task's ``Task.hf_files``.

Embedder (``embedder_files``): ``SentenceTransformer`` = Transformer -> last-token Pooling ->
Normalize, with Qwen3-Embedding's query prompt. The tokenizer's post-processor is set to append
``<|endoftext|>`` so that transformers, sentence-transformers and vLLM all pool the same token
megaemb trained on.

Generative reranker (``cross_encoder_files``): ``CrossEncoder`` = Transformer over the
Qwen3-Reranker prompt, which ``chat_template.jinja`` renders from a ``(query, document)`` pair
(``tasks.reranker_prompt.chat_template``; ``prompt=`` of ``predict`` / ``rank`` is the
instruction), then, for the ``*ForCausalLM`` export, ``LogitScore(yes, no)`` (``l_yes - l_no``
at the last position, left padding, ``logits_to_keep=1``), or for ``--to_seq_cls`` the
one-logit head itself. The template is the export's tokenizer chat template (it replaces the
base's ChatML one, which a reranker does not use). Both scores are megaemb's ``l_yes - l_no``; the saved activation is
sigmoid, so ``predict`` returns P(yes), the model card's score (``activation_fn=nn.Identity()``
gives the logit).
"""
from __future__ import annotations

import json
import os

from megaemb.convert.reranker import score_token_ids
from megaemb.tasks.reranker_prompt import chat_template

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


def embedder_files(out_dir: str, config: dict | None, max_seq_length: int, seq_cls: bool) -> None:
    """``Task.hf_files`` of the embedder: the pooled end token, and beside a model (``config``
    given; None for a PEFT adapter folder) the sentence-transformers files."""
    append_end_token(out_dir)
    if config is not None:
        write_st_files(out_dir, config["hidden_size"], max_seq_length)


SIGMOID = "torch.nn.modules.activation.Sigmoid"


def cross_encoder_files(out_dir: str, config: dict | None, max_seq_length: int, seq_cls: bool) -> None:
    """``Task.hf_files`` of the generative reranker (see the module docstring): beside a model
    (``config``, which gains the ``CrossEncoder`` activation), the chat template and the
    ``CrossEncoder`` modules; nothing for a PEFT adapter folder (the tokenizer as it was).
    The yes / no ids are the tokenizer's in ``out_dir`` (``convert.reranker.score_token_ids``)."""
    if config is None:
        return
    with open(os.path.join(out_dir, "chat_template.jinja"), "w") as f:
        f.write(chat_template())
    config["sentence_transformers"] = {"activation_fn": SIGMOID}
    modules = [{"idx": 0, "name": "0", "path": "",
                "type": "sentence_transformers.base.modules.transformer.Transformer"}]
    if not seq_cls:
        modules.append({"idx": 1, "name": "1", "path": "1_LogitScore",
                        "type": "sentence_transformers.cross_encoder.modules.logit_score.LogitScore"})
        os.makedirs(os.path.join(out_dir, "1_LogitScore"), exist_ok=True)
        yes, no = score_token_ids(out_dir)
        _dump(os.path.join(out_dir, "1_LogitScore", "config.json"),
              {"true_token_id": yes, "false_token_id": no, "module_input_name": "causal_logits"})
    _dump(os.path.join(out_dir, "modules.json"), modules)
    _dump(os.path.join(out_dir, "sentence_bert_config.json"), {
        "transformer_task": "sequence-classification" if seq_cls else "text-generation",
        # pairs are text to the CrossEncoder, rendered as query / document messages
        "modality_config": {"text": {"method": "forward", "method_output_name": "logits"},
                            "message": {"method": "forward", "method_output_name": "logits",
                                        "format": "flat"}},
        "module_output_name": "scores" if seq_cls else "causal_logits",
        "max_seq_length": max_seq_length})
    _dump(os.path.join(out_dir, "config_sentence_transformers.json"), {
        "model_type": "CrossEncoder", "prompts": {}, "default_prompt_name": None,
        "activation_fn": SIGMOID})


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
