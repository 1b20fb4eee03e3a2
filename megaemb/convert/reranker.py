"""A generative reranker's HF forms: ``Qwen3ForCausalLM`` -> ``Qwen3ForSequenceClassification``.

Qwen3-Reranker scores ``l_yes - l_no`` at the last position (``megaemb.model.heads.YesNoHead``).
That is one linear map of the last hidden state, so a sequence-classification model with one
label and ``score.weight = W[yes] - W[no]`` (``[1, h]``; ``W`` the ``lm_head``, or the word
embedding when tied) gives the same logit from the same weights: the form vLLM's ``/score``
and servers without yes/no support load. Its score is that logit; P(yes) = sigmoid of it.

``export --to_hf true --to_seq_cls true`` writes it (``mcore_to_hf.write_hf_model``).

The sequence-classification reranker (``--task_type reranker``) trains that form directly. From
an HF checkpoint without ``score.weight`` (a Qwen3-Reranker, a Qwen3 base model, an embedder),
its classifier starts as ``W[yes] - W[no]`` of the checkpoint's output layer (``lm_head``, or
the word embedding when tied; ``initial_score_weight``): a Qwen3-Reranker then scores exactly
as it did, and any Qwen3 starts from a deterministic score rather than ms-swift's random head.
An untied checkpoint without ``lm_head`` (nothing to read) starts from zeros (every score 0,
P = 0.5; the first step's gradient moves ``w`` alone).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from megaemb.model.heads import QWEN3_NO, QWEN3_YES
from megaemb.shape import Qwen3Shape

QWEN3_PAD = 151643  # <|endoftext|>: the Qwen3 tokenizer's padding token
SEQ_CLS_ARCHITECTURES = {"qwen3": "Qwen3ForSequenceClassification",
                         "qwen3_moe": "Qwen3MoeForSequenceClassification"}


def score_token_ids(tokenizer_dir: str) -> tuple[int, int]:
    """The reranker's (yes, no) token ids in ``tokenizer_dir``'s tokenizer (environment as
    ``reranker_prompt.score_token_ids``)."""
    from transformers import AutoTokenizer

    from megaemb.tasks.reranker_prompt import score_token_ids as ids

    return ids(AutoTokenizer.from_pretrained(tokenizer_dir))


def score_weight(weight: torch.Tensor, yes_id: int = QWEN3_YES, no_id: int = QWEN3_NO) -> torch.Tensor:
    """``W`` ``[V, h]`` (``lm_head``, or the tied word embedding) -> ``score.weight`` ``[1, h]``
    = ``W[yes] - W[no]``, in ``W``'s dtype (computed in fp32)."""
    return (weight[yes_id].float() - weight[no_id].float()).unsqueeze(0).to(weight.dtype)


def initial_score_weight(ckpt) -> torch.Tensor:
    """``score.weight`` ``[1, h]`` for an ``hf_to_mcore.HFCheckpoint`` that has none (see the
    module docstring), reading only the yes/no rows of its output layer."""
    shape = ckpt.shape
    name = ("lm_head.weight" if ckpt.has("lm_head.weight") else
            "embed_tokens.weight" if shape.tie_word_embeddings else None)
    if name is None:
        return torch.zeros(1, shape.hidden_size, dtype=ckpt.dtype("embed_tokens.weight"))
    yes, no = score_token_ids(ckpt.dir)
    return score_weight(ckpt.rows(name, [yes, no]), 0, 1)


def seq_cls_tensors(tensors: Iterable[tuple[str, torch.Tensor]], shape: Qwen3Shape,
                    yes_id: int = QWEN3_YES, no_id: int = QWEN3_NO
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """A ``*ForCausalLM``'s HF tensors (the conversion table's names, ``lm_head.weight`` when
    untied) -> the ``*ForSequenceClassification``'s: the same base tensors, ``lm_head`` dropped,
    ``score.weight`` last."""
    w_name = "embed_tokens.weight" if shape.tie_word_embeddings else "lm_head.weight"
    score = None
    for name, tensor in tensors:
        if name == w_name:
            score = score_weight(tensor, yes_id, no_id)
        if name != "lm_head.weight":
            yield name, tensor
    if score is None:
        raise ValueError(f"no {w_name} among the tensors: the yes/no rows of the output layer "
                         "are needed for score.weight")
    yield "score.weight", score


def score_token_ids(tokenizer_dir: str) -> tuple[int, int]:
    """The reranker's (yes, no) token ids in ``tokenizer_dir``'s tokenizer (environment as
    ``reranker_prompt.score_token_ids``)."""
    from transformers import AutoTokenizer

    from megaemb.tasks.reranker_prompt import score_token_ids as ids

    return ids(AutoTokenizer.from_pretrained(tokenizer_dir))


def seq_cls_config(config: dict) -> dict:
    """A ``*ForCausalLM``'s ``config.json`` -> its one-label ``*ForSequenceClassification``'s
    (it scores each row's last token that is not ``pad_token_id``, which Qwen3 configs may
    leave out: then the tokenizer's)."""
    out = dict(config)
    if out.get("pad_token_id") is None:
        out["pad_token_id"] = QWEN3_PAD
    out.update(architectures=[SEQ_CLS_ARCHITECTURES[config["model_type"]]], num_labels=1,
               id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0}, tie_word_embeddings=False)
    return out
