"""``EmbeddingModel``: megatron-core embedding + ``TransformerBlock`` + last-token pooling.

No vocabulary logits. A task may add a scoring head (``megaemb.tasks``): the generative
reranker's ``YesNoHead`` reads two rows of the output layer (``output_layer.weight``, or the
word embedding when tied) on the last stage; the sequence-classification reranker's
``SeqClsHead`` reads its one-row classifier (``output_layer.weight`` ``[1, h]``). Under pipeline parallelism each stage holds its
slice of layers; the first stage owns the word embedding (``pre_process``), the last owns
the final norm and pooling (``post_process``). Tied under pipeline parallelism, the last stage
holds a copy of the word embedding as ``output_layer.weight``, as megatron's ``GPTModel`` does
(``share_embeddings_and_output_weights``): equal to the first stage's from the start (filled
from the same checkpoint tensor, or an all-reduce over the embedding group at build), its
gradient all-reduced with the first stage's by ``finalize_model_grads`` (so both take the
same update), marked ``shared`` (the gradient norm counts it once), and checkpointed as a
replica of ``embedding.word_embeddings.weight`` (no second tensor on disk).

The input is a ``TextBatch`` of ``n`` texts, padded ``[n, s]`` or packed ``[1, T]`` (see
``megaemb.data.batching``); the layout lives in the batch, the model has no branch on it
beyond handing a packed batch's document boundaries to attention (``DocumentPacking``:
megatron's ``PackedSeqParams``, format "thd" for Transformer Engine, "sbhd" for torch
attention) and its per-token RoPE positions to the rotary embedding.

Shapes per rank (tp = tensor parallel size; sequence parallel scatters the sequence;
s must divide by tp under SP, which the batch builders ensure):
    input_ids [b, s]
    -> word embedding [s, b, h] ([s/tp, b, h] with SP)   (vocab rows split over TP)
    -> decoder        [s, b, h] ([s/tp, b, h] with SP)   (non-last stages return this)
    -> pooled         [n, h] -> embeddings [n, dim]     (last stage, replicated over TP;
                                                          with SP pooled per rank, summed)
"""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock

from megaemb import platform
from megaemb.data.batching import TextBatch
from megaemb.model import heads
from megaemb.model.attention import DocumentPacking
from megaemb.model.pooling import finish_embedding, last_token_pool, sequence_parallel_pool
from megaemb.model.qwen3 import block_spec, resolve_attention
from megaemb.shape import Qwen3Shape


class EmbeddingModel(MegatronModule):
    def __init__(self, config, shape: Qwen3Shape, *, pre_process: bool = True,
                 post_process: bool = True, attention: str = "auto",
                 vp_stage: int | None = None, head: torch.nn.Module | None = None,
                 output_layer: str | None = None):
        super().__init__(config=config)
        self.shape = shape
        self.pre_process = pre_process
        self.post_process = post_process
        self.model_type = "encoder_or_decoder"  # read by megatron's schedules
        # read by finalize_model_grads: all-reduce the word embedding's gradient with the last
        # stage's copy (a tied head under pipeline parallelism; a no-op on one stage)
        self.share_embeddings_and_output_weights = output_layer == "lm_head" and shape.tie_word_embeddings
        if pre_process:
            self.embedding = LanguageModelEmbedding(
                config=config, vocab_size=shape.padded_vocab_size,
                max_sequence_length=shape.max_position_embeddings, position_embedding_type="rope")
        self.attention = resolve_attention(attention)
        self.rotary_pos_emb = RotaryEmbedding(
            kv_channels=config.kv_channels, rotary_percent=1.0, rotary_base=shape.rope_theta,
            use_cpu_initialization=config.use_cpu_initialization)
        self.decoder = TransformerBlock(config=config, spec=block_spec(config, self.attention),
                                        pre_process=pre_process, post_process=post_process,
                                        vp_stage=vp_stage)
        self.head = head  # None: pooled embeddings (a head holds no parameters)
        if output_layer and post_process:
            self._attach_output_layer(output_layer)

    def _attach_output_layer(self, kind: str) -> None:
        """The weight the head reads on the last stage (``tasks.Task.output_layer``): ``"score"``,
        the one-row classifier; ``"lm_head"``, ``W``: an untied output layer (megatron's
        ``output_layer.weight``), or tied, the word embedding: this stage's, or on a last stage
        without it, a copy of the first stage's (see the module docstring)."""
        if kind == "score":
            self.output_layer = heads.score_layer(self.config, self.shape)
            return
        if self.shape.tie_word_embeddings and self.pre_process:
            return
        self.output_layer = heads.output_layer(self.config, self.shape)
        if self.shape.tie_word_embeddings:  # megatron's marks: the gradient norm counts it once,
            self.output_layer.weight.shared = True  # and its gradient is all-reduced with stage 1's
            self.output_layer.weight.shared_embedding = True

    @property
    def holds_embedding_copy(self) -> bool:
        """Whether ``output_layer.weight`` is this last stage's copy of the word embedding."""
        return self.share_embeddings_and_output_weights and hasattr(self, "output_layer")

    def shared_embedding_or_output_weight(self) -> torch.Tensor | None:
        """The tied ``W`` this stage holds (megatron's name, read by ``finalize_model_grads``):
        the word embedding on the first stage, its copy on the last, None elsewhere."""
        if self.pre_process:
            return self.embedding.word_embeddings.weight
        return self.output_layer.weight if self.holds_embedding_copy else None

    def checkpoint_source(self, name: str) -> str:
        """The parameter whose checkpoint tensor fills ``name``: the word embedding's for the
        last stage's tied copy, else ``name`` itself."""
        if name == "output_layer.weight" and self.holds_embedding_copy:
            return "embedding.word_embeddings.weight"
        return name

    def sync_embedding_copy(self) -> None:
        """Collective over megatron's embedding group (the first and last pipeline stages; a
        no-op elsewhere and when untied): the last stage's copy of a tied word embedding takes
        the first stage's values (zeroed, then all-reduced, as megatron's ``GPTModel``)."""
        group = parallel_state.get_embedding_group(check_initialized=False)
        if (not self.share_embeddings_and_output_weights or group is None
                or dist.get_world_size(group) == 1
                or dist.get_rank() not in dist.get_process_group_ranks(group)):
            return
        weight = self.shared_embedding_or_output_weight()
        with torch.no_grad():
            if not self.pre_process:
                weight.zero_()
            dist.all_reduce(weight.data, group=group)

    def output_shape(self, n: int, dim: int | None = None) -> tuple[int, ...]:
        """What the last stage returns for ``n`` texts: scores ``(n,)`` with a head, else
        embeddings ``(n, dim or h)``."""
        return (n,) if self.head is not None else (n, dim or self.shape.hidden_size)

    def head_weight(self) -> torch.Tensor:
        """What the head reads: this rank's ``[V/tp, h]`` shard of the output layer ``W`` (tied:
        the word embedding), or the classifier's ``[1, h]``."""
        owner = getattr(self, "output_layer", None) or self.embedding.word_embeddings
        return owner.weight

    # Checkpoints are layer-spec independent (a checkpoint made with the local/SDPA spec on a
    # CPU loads under Transformer Engine and back): the keys are TE's (block_spec maps the
    # local spec's norms onto them), and no ``_extra_state`` is saved or required. Megatron's
    # local linears save an empty one; TE linears and TE attention save FP8 scaling metadata,
    # which carries nothing without FP8 (megaemb never enables it), and a local-spec
    # checkpoint has none for TE attention, which megatron's load would report as missing.
    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if self.holds_embedding_copy:  # a replica of the first stage's tensor (megatron's tie)
            key = f"{prefix}output_layer.weight"
            tensor = state[key]
            state[key] = dataclasses.replace(
                tensor, key=f"{prefix}embedding.word_embeddings.weight",
                replica_id=(1, *tensor.replica_id[1:]), allow_shape_mismatch=True)
        return {k: v for k, v in state.items() if not _is_extra_state(k)}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As ``nn.Module.load_state_dict``, but ``_extra_state`` entries may be absent (they
        are not checkpointed, see :meth:`sharded_state_dict`)."""
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if not _is_extra_state(k)]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(f"EmbeddingModel.load_state_dict: missing keys {missing}, "
                               f"unexpected keys {result.unexpected_keys}")
        return result

    def set_input_tensor(self, input_tensor):
        """Pipeline stages > 0 receive ``[s, b, h]`` from the previous stage here."""
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    @property
    def sequence_multiple(self) -> int:
        """Batches' sequence length must divide by this (sequence parallel splits it over TP)."""
        return self.config.tensor_model_parallel_size if self.config.sequence_parallel else 1

    @property
    def packs_by_default(self) -> bool:
        """Whether batches are packed when the user does not say (``--packing``)."""
        return platform.default_packing() and self.attention != "local"

    def forward(self, batch: TextBatch, *, dim: int | None = None, normalize: bool = True) -> torch.Tensor:
        """Returns embeddings ``[n, dim or h]`` (fp32) on the last stage (with a head: its scores
        ``[n]``), else hidden ``[s, b, h]``."""
        input_ids = batch.input_ids
        seq_len = input_ids.shape[1]
        if seq_len % self.sequence_multiple:
            raise ValueError(f"sequence length {seq_len} must divide by the tensor-parallel size "
                             f"{self.sequence_multiple} under sequence parallelism")
        decoder_input = self.embedding(input_ids=input_ids, position_ids=None) if self.pre_process else None
        packing = None
        if batch.packed and self.attention == "te":
            # "thd": megatron / TE apply RoPE per document from cu_seqlens (positions restart),
            # reading frequencies [max_seqlen, 1, 1, d] from position 0 for each document
            rotary = self.rotary_pos_emb(batch.max_seqlen)
            packing = DocumentPacking.of(batch.cu_seqlens, batch.max_seqlen, "thd")
        elif batch.packed:
            # "sbhd" [T, 1, ...]: per-token frequencies [T, 1, 1, d] gathered by position
            rotary = self.rotary_pos_emb(batch.max_seqlen)[batch.position_ids.reshape(-1)]
            packing = DocumentPacking.of(batch.cu_seqlens, batch.max_seqlen, "sbhd")
        else:
            rotary = self.rotary_pos_emb(seq_len)
        hidden = self.decoder(hidden_states=decoder_input, attention_mask=None, rotary_pos_emb=rotary,
                              packed_seq_params=packing)
        if not self.post_process:
            return hidden
        if self.head is not None:
            return self.head(hidden, batch.pool_index, self.head_weight())
        # pooling and the loss are replicated over TP; under SP each rank pools its own rows
        pool = sequence_parallel_pool if self.config.sequence_parallel else last_token_pool
        return finish_embedding(pool(hidden, batch.pool_index), dim=dim, normalize=normalize)


def _is_extra_state(key: str) -> bool:
    return key.rsplit(".", 1)[-1].startswith("_extra_state")


def build_model(config, shape: Qwen3Shape, *, attention: str = "auto",
                head: torch.nn.Module | None = None,
                output_layer: str | None = None) -> EmbeddingModel:
    """This rank's pipeline stage of the model, on the current device (call after parallel init);
    ``head`` and ``output_layer``: a task's scoring head and the weight it reads."""
    model = EmbeddingModel(
        config, shape, attention=attention,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(), head=head, output_layer=output_layer)
    model = model.to(platform.device())
    model.sync_embedding_copy()
    return model
