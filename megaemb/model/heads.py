"""Heads on the backbone's final-norm hidden states, each scoring a text at its last token:
``YesNoHead`` (the generative reranker's score) and ``SeqClsHead`` (the sequence-classification
reranker's one logit, HF ``Qwen3ForSequenceClassification``).

Qwen3-Reranker scores a (query, document) prompt by the logits of "yes" and "no" at its last
position: ``l_yes - l_no = h_last . (W[yes] - W[no])``, with ``W`` the output layer (or, when
tied, the word embedding). ``YesNoHead`` computes exactly that and nothing more: it selects each
pair's last-token hidden state first, then multiplies by the two rows of ``W``. It never
builds ``[.., vocab]`` logits (which is what costs others gigabytes per rank).

Under tensor parallelism ``W`` is split by vocabulary rows (megatron's vocab-parallel
embedding / column-parallel output layer): the "yes" and "no" rows may live on different
ranks. Each rank contributes the rows it owns (zeros otherwise) and one all-reduce of the two
rows ``[2, h]`` gives every rank both; backward is the identity there, so each row's gradient
lands on its owner rank only (the score and the loss are replicated over TP, so every rank
holds the same full gradient of the two rows). Under sequence parallelism each rank holds a
slice of the sequence: it selects the last tokens it holds and one all-reduce of ``[n, h]``
gives every rank all of them (backward: each rank keeps the gradient of its own tokens),
instead of gathering the whole ``[s, b, h]`` sequence.

The head sits on the last pipeline stage, after the final norm, on ``EmbeddingModel`` (built
by ``tasks.reranker.yes_no_head``), which owns the output layer (``output_layer.weight``,
megatron's ``GPTModel`` name, see ``megaemb.convert.mapping``) and passes ``W`` here. Tied
under pipeline parallelism, ``W`` is the last stage's copy of the word embedding (megatron's
shared embedding, its gradient all-reduced with the first stage's; see ``EmbeddingModel``).
"""
from __future__ import annotations

import torch
from megatron.core import parallel_state, tensor_parallel

from megaemb.model.pooling import last_token_pool

QWEN3_YES, QWEN3_NO = 9693, 2152  # "yes" / "no" in the Qwen3 tokenizer (Qwen3-Reranker's model card)


def select_last_tokens(hidden: torch.Tensor, pool_index: torch.Tensor,
                       sequence_parallel: bool = False) -> torch.Tensor:
    """hidden ``[s, b, h]`` (``[s/tp, b, h]``, this rank's slice, under sequence parallelism),
    pool_index ``[n]`` (flat, s-major over the full ``[s, b]`` grid, as ``TextBatch``'s)
    -> ``[n, h]``, replicated over TP."""
    if not sequence_parallel:
        return last_token_pool(hidden, pool_index)
    flat = hidden.reshape(-1, hidden.shape[-1])
    start = parallel_state.get_tensor_model_parallel_rank() * flat.shape[0]
    local = pool_index.to(hidden.device) - start
    held = (local >= 0) & (local < flat.shape[0])
    mine = torch.where(held[:, None], flat[local.clamp(0, flat.shape[0] - 1)], 0.0)
    return tensor_parallel.reduce_from_tensor_model_parallel_region(mine)


def vocab_rows(weight: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
    """Rows ``token_ids`` of the vocab-parallel ``W`` whose local shard is ``weight``
    ``[V/tp, h]`` -> ``[len(token_ids), h]``, replicated over TP; their gradient goes to the
    owner rank's rows of ``weight`` only, as a sparse tensor of those rows (megatron's DDP adds
    it to the dense ``main_grad`` buffer)."""
    per_rank = weight.shape[0]
    start = parallel_state.get_tensor_model_parallel_rank() * per_rank
    local = torch.tensor(token_ids, device=weight.device) - start
    owned = (local >= 0) & (local < per_rank)
    # a lookup with a sparse gradient: 2 rows, not a dense [V/tp, h] zeros-but-two tensor that
    # would live through the backward pass (tied, until the word embedding's own gradient)
    rows = torch.nn.functional.embedding(local.clamp(0, per_rank - 1), weight, sparse=True)
    rows = torch.where(owned[:, None], rows, 0.0)
    return tensor_parallel.reduce_from_tensor_model_parallel_region(rows)


def output_layer(config, shape) -> tensor_parallel.ColumnParallelLinear:
    """An untied output layer ``W``: ``[V_padded/tp, h]`` per rank, vocab-parallel like the word
    embedding (megatron's ``GPTModel.output_layer``; checkpoint key ``output_layer.weight``)."""
    return tensor_parallel.ColumnParallelLinear(
        shape.hidden_size, shape.padded_vocab_size, config=config, init_method=config.init_method,
        bias=False, gather_output=False)


def score_layer(config, shape) -> torch.nn.Linear:
    """The sequence-classification reranker's classifier ``w``: ``[1, h]``, no bias, the same
    on every TP rank (see the module docstring). Zeros until a checkpoint fills it (built
    without drawing from any random generator, so other parameters' draws are unchanged)."""
    layer = torch.nn.Linear(shape.hidden_size, 1, bias=False, dtype=config.params_dtype,
                            device="meta")
    layer.to_empty(device=torch.empty(0).device)  # the current default device (meta included)
    torch.nn.init.zeros_(layer.weight)
    return layer


class LastTokenHead(torch.nn.Module):
    """A score per text from its last token's final-norm hidden state and the output layer's
    weight (``EmbeddingModel.head_weight``); holds no parameters. Subclasses give ``score``."""

    def __init__(self, sequence_parallel: bool = False):
        super().__init__()
        self.sequence_parallel = sequence_parallel

    def score(self, h_last: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``[n, h]`` last-token hidden states (replicated over TP) -> ``[n]`` scores (fp32)."""
        raise NotImplementedError

    def forward(self, hidden: torch.Tensor, pool_index: torch.Tensor,
                weight: torch.Tensor) -> torch.Tensor:
        """hidden ``[s, b, h]`` (SP: this rank's ``[s/tp, b, h]``), pool_index ``[n]``,
        weight: this rank's output layer weight -> ``[n]`` scores (fp32), replicated over TP."""
        return self.score(select_last_tokens(hidden, pool_index, self.sequence_parallel), weight)


class SeqClsHead(LastTokenHead):
    """The sequence-classification reranker's logit ``h_last . w``; ``weight``: the model's
    ``score_layer`` weight ``[1, h]`` (replicated over TP)."""

    def score(self, h_last: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return h_last.float() @ weight[0].float()


class YesNoHead(LastTokenHead):
    """The generative reranker's score ``l_yes - l_no`` at each pair's last token, from the
    backbone's final-norm hidden states and the (vocab-parallel) output layer's weight.
    Holds no parameters: ``W`` is the output layer's or, tied, the word embedding's."""

    def __init__(self, yes_id: int = QWEN3_YES, no_id: int = QWEN3_NO, *, vocab_size: int,
                 sequence_parallel: bool = False):
        super().__init__(sequence_parallel)
        for name, token in (("yes", yes_id), ("no", no_id)):
            if not 0 <= token < vocab_size:
                raise ValueError(f"the {name!r} token id {token} is outside the vocabulary "
                                 f"(0..{vocab_size - 1})")
        if yes_id == no_id:
            raise ValueError(f"the 'yes' and 'no' token ids are both {yes_id}")
        self.token_ids = [yes_id, no_id]

    def score(self, h_last: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``weight``: this rank's ``[V/tp, h]`` shard of ``W``; scores ``l_yes - l_no``."""
        yes, no = vocab_rows(weight, self.token_ids).float()
        return h_last.float() @ (yes - no)
