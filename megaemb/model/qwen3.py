"""Qwen3 / Qwen3-MoE Hugging Face config -> megatron-core ``TransformerConfig`` + layer spec.

Qwen3 facts that matter: ``head_dim`` (128 in every released size) is not hidden/heads, so it
is passed as ``kv_channels``; GQA (``num_key_value_heads``); RMSNorm everywhere including
per-head q/k norms before RoPE; SwiGLU; no linear biases; RoPE with ``rope_theta``. Qwen3-MoE
adds ``num_experts`` routed experts of ``moe_intermediate_size``, top-k softmax routing with
renormalised weights (``norm_topk_prob``), and optionally dense layers (``mlp_only_layers``).
"""
from __future__ import annotations

import copy
import torch
import torch.nn.functional as F
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from megaemb import platform
from megaemb.config import ParallelConfig
from megaemb.model.attention import SDPAAttention
from megaemb.model.norm import HeadRMSNorm, RMSNorm
from megaemb.shape import Qwen3Shape

def transformer_config(shape: Qwen3Shape, parallel: ParallelConfig, *, bf16: bool = False,
                       recompute_granularity: str | None = None, recompute_method: str = "uniform",
                       recompute_num_layers: int = 1, attention: str = "auto",
                       hidden_dropout: float = 0.0, attention_dropout: float = 0.0) -> TransformerConfig:
    """Build the megatron-core config (fp32 params, or bf16 with ``bf16=True``); fusions as
    ``platform.fusions`` decides for this machine and attention backend. Dropout is off
    unless asked for (Qwen3 is trained without)."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    moe = {}
    if shape.num_experts:
        moe = dict(
            num_moe_experts=shape.num_experts, moe_router_topk=shape.moe_topk,
            moe_ffn_hidden_size=shape.moe_ffn_hidden_size,
            # topk over logits then softmax == softmax, topk, renormalise (norm_topk_prob)
            moe_router_pre_softmax=not shape.norm_topk_prob,
            moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
            moe_layer_freq=list(shape.moe_layer_pattern), moe_router_dtype="fp32",
        )
    return TransformerConfig(
        num_layers=shape.num_layers, hidden_size=shape.hidden_size,
        num_attention_heads=shape.num_heads, num_query_groups=shape.num_kv_heads,
        kv_channels=shape.head_dim, ffn_hidden_size=shape.ffn_hidden_size,
        normalization="RMSNorm", layernorm_epsilon=shape.rms_norm_eps, qk_layernorm=True,
        add_bias_linear=False, add_qkv_bias=False,
        gated_linear_unit=True, activation_func=F.silu,
        hidden_dropout=hidden_dropout, attention_dropout=attention_dropout,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=bf16,
        variable_seq_lengths=True, moe_token_dispatcher_type="alltoall",
        # no biases, no masked softmax (SDPA / TE attention), no apex layer norm
        bias_dropout_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        **platform.fusions(resolve_attention(attention)),
        # megatron sets the tensor-parallel attributes of weights (read by the converter, DDP and
        # grad-norm) only while initialising them, so initialise even when weights will load
        perform_initialization=True, use_cpu_initialization=False,
        recompute_granularity=recompute_granularity,
        recompute_method=recompute_method if recompute_granularity == "full" else None,
        recompute_num_layers=recompute_num_layers if recompute_granularity == "full" else None,
        **moe,
    )


ATTENTION_BACKENDS = ("auto", "te", "sdpa", "local")

# Checkpoint keys are the Transformer Engine spec's, whatever the spec: the local spec renames
# its unfused norms to TE's fused names. TE fuses the pre-MLP norm only in dense layers (MoE
# layers keep ``pre_mlp_layernorm``), so MoE layers keep that key unrenamed.
_MOE_LAYER_UNMAPPED = ("pre_mlp_layernorm.",)


def resolve_attention(attention: str) -> str:
    """``auto`` -> ``te`` when Transformer Engine imports, else ``sdpa``; checks the name."""
    if attention not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {attention!r} (auto, te, sdpa, local)")
    if attention == "auto":
        return "te" if platform.has_transformer_engine() else "sdpa"
    if attention == "te" and not platform.has_transformer_engine():
        raise ValueError("--attention te needs Transformer Engine, which is not installed")
    return attention


def block_spec(config: TransformerConfig, attention: str = "auto") -> TransformerBlockSubmodules:
    """This pipeline stage's layer specs.

    attention: ``te`` (Transformer Engine), ``sdpa`` (torch SDPA), ``local`` (megatron's
    unfused reference), or ``auto`` = ``te`` when it imports, else ``sdpa``. Every choice
    gives the same checkpoint keys (see ``EmbeddingModel.sharded_state_dict``).
    """
    attention = resolve_attention(attention)
    if attention == "te":
        return get_gpt_decoder_block_spec(config, use_transformer_engine=True)
    spec = copy.deepcopy(get_gpt_decoder_block_spec(config, use_transformer_engine=False,
                                                    normalization="RMSNorm"))
    for layer in spec.layer_specs:
        sub = layer.submodules
        sub.input_layernorm = RMSNorm
        sub.pre_mlp_layernorm = RMSNorm
        if sub.mlp.module is MoELayer:
            sub.sharded_state_dict_keys_map = {k: v for k, v in sub.sharded_state_dict_keys_map.items()
                                               if k not in _MOE_LAYER_UNMAPPED}
        attn = sub.self_attention.submodules
        attn.q_layernorm = HeadRMSNorm
        attn.k_layernorm = HeadRMSNorm
        if attention == "sdpa":
            attn.core_attention = SDPAAttention
    spec.layer_norm = RMSNorm
    return spec
