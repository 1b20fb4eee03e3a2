"""What megaemb reads from an HF ``config.json``, and whether a parallel layout can split it.

No megatron import here: the launcher checks a layout against the model before any rank starts.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from megaemb.config import ParallelConfig

class ConversionError(ValueError):
    """A one-line, user-facing description of what is wrong with a checkpoint."""


def read_hf_config(model_dir: str) -> dict:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isdir(model_dir):
        raise ConversionError(f"{model_dir}: no such model directory")
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: missing (an HF model directory needs config.json)")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: invalid JSON ({e})") from None


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

    @property
    def attention_params(self) -> int:
        """Weights of one layer's q, k, v and output projections."""
        h, d = self.hidden_size, self.head_dim
        return h * (self.num_heads + 2 * self.num_kv_heads) * d + self.num_heads * d * h

    def num_parameters(self) -> int:
        """Weights of the embedding model (word embedding + decoder; norms left out): what a
        checkpoint stores per value kind."""
        h, attn = self.hidden_size, self.attention_params
        total = self.vocab_size * h
        for layer in range(self.num_layers):
            if self.is_moe_layer(layer):
                total += attn + self.num_experts * (3 * h * self.moe_ffn_hidden_size + h)
            else:
                total += attn + 3 * h * self.ffn_hidden_size
        return total


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
