"""Qwen3 / Qwen3-MoE Hugging Face config -> megatron-core ``TransformerConfig`` + layer spec.

Qwen3 facts that matter: ``head_dim`` (128 in every released size) is not hidden/heads, so it
is passed as ``kv_channels``; GQA (``num_key_value_heads``); RMSNorm everywhere including
per-head q/k norms before RoPE; SwiGLU; no linear biases; RoPE with ``rope_theta``. Qwen3-MoE
adds ``num_experts`` routed experts of ``moe_intermediate_size``, top-k softmax routing with
renormalised weights (``norm_topk_prob``), and optionally dense layers (``mlp_only_layers``).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

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

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen3_moe")
VOCAB_PAD_MULTIPLE = 128  # divisible by every TP size we support, so shapes are layout-free


@dataclass(frozen=True)
class Qwen3Shape:
    """What megaemb reads from an HF ``config.json`` (a plain dict)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    num_experts: int = 0
    moe_topk: int = 0
    moe_ffn_hidden_size: int = 0
    norm_topk_prob: bool = True
    moe_layer_pattern: tuple[int, ...] = ()

    @property
    def padded_vocab_size(self) -> int:
        m = VOCAB_PAD_MULTIPLE
        return (self.vocab_size + m - 1) // m * m

    @classmethod
    def from_hf(cls, cfg: dict, source: str = "config.json") -> "Qwen3Shape":
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"{source}: model_type {model_type!r} is not supported "
                             f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        try:
            heads = cfg["num_attention_heads"]
            hidden = cfg["hidden_size"]
            rope_theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 1e6)
            rope_scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
            if cfg.get("attention_bias"):
                raise ValueError(f"{source}: attention_bias=true is not supported "
                                 "(no released Qwen3 uses it)")
            if rope_scaling.get("rope_type", rope_scaling.get("type", "default")) not in ("default", None):
                raise ValueError(f"{source}: rope_scaling {rope_scaling} is not supported")
            kw = dict(
                model_type=model_type, vocab_size=cfg["vocab_size"], hidden_size=hidden,
                num_layers=cfg["num_hidden_layers"], num_heads=heads,
                num_kv_heads=cfg.get("num_key_value_heads", heads),
                head_dim=cfg.get("head_dim") or hidden // heads,
                ffn_hidden_size=cfg["intermediate_size"], rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
                rope_theta=float(rope_theta),
                max_position_embeddings=cfg.get("max_position_embeddings", 32768),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            )
            if model_type == "qwen3_moe":
                n = kw["num_layers"]
                dense = set(cfg.get("mlp_only_layers") or [])
                step = cfg.get("decoder_sparse_step", 1)
                kw.update(num_experts=cfg.get("num_experts") or cfg["num_local_experts"], moe_topk=cfg["num_experts_per_tok"],
                          moe_ffn_hidden_size=cfg["moe_intermediate_size"],
                          norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
                          moe_layer_pattern=tuple(int(i not in dense and (i + 1) % step == 0)
                                                  for i in range(n)))
        except KeyError as e:
            raise ValueError(f"{source}: missing field {e.args[0]!r}") from None
        return cls(**kw)

    def is_moe_layer(self, layer: int) -> bool:
        return bool(self.num_experts) and bool(self.moe_layer_pattern[layer])


def check_parallel_layout(shape: Qwen3Shape, parallel: ParallelConfig, source: str) -> None:
    """``ValueError`` naming the flag when ``parallel`` cannot split this model (checked before
    megatron builds it, whose own failures are shape errors deep inside a layer)."""
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    ep = parallel.expert_model_parallel_size
    needs = [("attention heads", shape.num_heads, tp, "--tensor_model_parallel_size"),
             ("key/value heads (num_key_value_heads)", shape.num_kv_heads, tp,
              "--tensor_model_parallel_size"),
             ("MLP width (intermediate_size)", shape.ffn_hidden_size, tp, "--tensor_model_parallel_size"),
             ("layers", shape.num_layers, pp, "--pipeline_model_parallel_size")]
    if shape.num_experts:
        needs += [("experts", shape.num_experts, ep, "--expert_model_parallel_size"),
                  ("expert MLP width (moe_intermediate_size)", shape.moe_ffn_hidden_size, tp,
                   "--tensor_model_parallel_size")]
    elif ep > 1:
        raise ValueError(f"{source}: --expert_model_parallel_size {ep} needs a MoE model "
                         f"({shape.model_type} has no experts)")
    for what, count, size, flag in needs:
        if count % size:
            raise ValueError(f"{source}: {flag} {size} does not divide the model's {count} {what}")


def transformer_config(shape: Qwen3Shape, parallel: ParallelConfig, *, bf16: bool = False,
                       recompute_granularity: str | None = None) -> TransformerConfig:
    """Build the megatron-core config (fp32 params, or bf16 with ``bf16=True``)."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    moe = {}
    if shape.num_experts:
        moe = dict(
            num_moe_experts=shape.num_experts, moe_router_topk=shape.moe_topk,
            moe_ffn_hidden_size=shape.moe_ffn_hidden_size,
            # topk over logits then softmax == softmax, topk, renormalise (norm_topk_prob)
            moe_router_pre_softmax=not shape.norm_topk_prob,
            moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
            moe_grouped_gemm=False,
            moe_layer_freq=list(shape.moe_layer_pattern), moe_router_dtype="fp32",
        )
    return TransformerConfig(
        num_layers=shape.num_layers, hidden_size=shape.hidden_size,
        num_attention_heads=shape.num_heads, num_query_groups=shape.num_kv_heads,
        kv_channels=shape.head_dim, ffn_hidden_size=shape.ffn_hidden_size,
        normalization="RMSNorm", layernorm_epsilon=shape.rms_norm_eps, qk_layernorm=True,
        add_bias_linear=False, add_qkv_bias=False,
        gated_linear_unit=True, activation_func=F.silu,
        hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=bf16,
        variable_seq_lengths=True, moe_token_dispatcher_type="alltoall",
        # fusions that need apex / TE, or compile with inductor
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
        # megatron sets the tensor-parallel attributes of weights (read by the converter, DDP and
        # grad-norm) only while initialising them, so initialise even when weights will load
        perform_initialization=True, use_cpu_initialization=False,
        recompute_granularity=recompute_granularity,
        recompute_method="uniform" if recompute_granularity == "full" else None,
        recompute_num_layers=1 if recompute_granularity == "full" else None,
        **moe,
    )


ATTENTION_BACKENDS = ("auto", "te", "sdpa", "local")

# Checkpoint keys are the Transformer Engine spec's, whatever the spec: the local spec renames
# its unfused norms to TE's fused names. TE fuses the pre-MLP norm only in dense layers (MoE
# layers keep ``pre_mlp_layernorm``), so MoE layers keep that key unrenamed.
_MOE_LAYER_UNMAPPED = ("pre_mlp_layernorm.",)


def block_spec(config: TransformerConfig, attention: str = "auto") -> TransformerBlockSubmodules:
    """This pipeline stage's layer specs.

    attention: ``te`` (Transformer Engine), ``sdpa`` (torch SDPA), ``local`` (megatron's
    unfused reference), or ``auto`` = ``te`` when it imports, else ``sdpa``. Every choice
    gives the same checkpoint keys (see ``EmbeddingModel.sharded_state_dict``).
    """
    if attention not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {attention!r} (auto, te, sdpa, local)")
    if attention == "auto":
        attention = "te" if platform.has_transformer_engine() else "sdpa"
    if attention == "te":
        if not platform.has_transformer_engine():
            raise ValueError("--attention te needs Transformer Engine, which is not installed")
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
