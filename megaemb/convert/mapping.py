"""The declarative HF <-> megatron-core name table for Qwen3 and Qwen3-MoE.

One row per megatron-core parameter: its name pattern, the HF tensor(s) it comes from and the
transform joining them. ``{layer}`` and ``{expert}`` are *global* indices here; converters
translate to a pipeline stage's / expert-parallel rank's local indices. The same rows drive
HF -> MCore (``merge``) and MCore -> HF (``split``) for every TP/PP/EP layout.

Transforms (HF shapes; ``ng`` query groups, ``hpg`` heads per group, ``d`` head_dim):
  rename   one tensor, same layout
  vocab    embedding ``[V, h]`` <-> ``[V_padded, h]`` (zero rows appended for TP divisibility)
  qkv      q ``[ng*hpg*d, h]``, k ``[ng*d, h]``, v ``[ng*d, h]`` <-> ``linear_qkv``
           ``[ng*(hpg+2)*d, h]`` interleaved per query group: ``[q_g0, k_g0, v_g0, q_g1, ...]``
  gate_up  gate ``[f, h]``, up ``[f, h]`` <-> ``linear_fc1`` ``[2f, h]`` = ``[gate; up]``
Merges work on any tensor-parallel slice (whole query groups / matching gate & up rows), so a
rank can read only its own rows of each HF tensor.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from megaemb.model.qwen3 import Qwen3Shape


@dataclass(frozen=True)
class Mapping:
    mcore: str
    hf: tuple[str, ...]
    kind: str = "rename"
    layers: str = "all"  # which decoder layers have it: all | dense | moe

    def applies_to(self, shape: Qwen3Shape, layer: int | None) -> bool:
        if layer is None or self.layers == "all":
            return True
        return (self.layers == "moe") == shape.is_moe_layer(layer)

    def regex(self) -> re.Pattern:
        pattern = re.escape(self.mcore).replace(r"\{layer\}", r"(?P<layer>\d+)")
        return re.compile("^" + pattern.replace(r"\{expert\}", r"(?P<expert>\d+)") + "$")

    def hf_names(self, **index) -> list[str]:
        return [name.format(**index) for name in self.hf]


def qwen3_mappings(shape: Qwen3Shape) -> list[Mapping]:
    """The table. HF names are without the ``model.`` prefix (Qwen3-Embedding spelling)."""
    L, A = "decoder.layers.{layer}", "layers.{layer}.self_attn"
    rows = [
        Mapping("embedding.word_embeddings.weight", ("embed_tokens.weight",), "vocab"),
        Mapping(f"{L}.input_layernorm.weight", ("layers.{layer}.input_layernorm.weight",)),
        Mapping(f"{L}.self_attention.linear_qkv.weight",
                (f"{A}.q_proj.weight", f"{A}.k_proj.weight", f"{A}.v_proj.weight"), "qkv"),
        Mapping(f"{L}.self_attention.q_layernorm.weight", (f"{A}.q_norm.weight",)),
        Mapping(f"{L}.self_attention.k_layernorm.weight", (f"{A}.k_norm.weight",)),
        Mapping(f"{L}.self_attention.linear_proj.weight", (f"{A}.o_proj.weight",)),
        Mapping(f"{L}.pre_mlp_layernorm.weight", ("layers.{layer}.post_attention_layernorm.weight",)),
        Mapping(f"{L}.mlp.linear_fc1.weight",
                ("layers.{layer}.mlp.gate_proj.weight", "layers.{layer}.mlp.up_proj.weight"), "gate_up",
                "dense"),
        Mapping(f"{L}.mlp.linear_fc2.weight", ("layers.{layer}.mlp.down_proj.weight",), "rename", "dense"),
        Mapping("decoder.final_layernorm.weight", ("norm.weight",)),
    ]
    if shape.num_experts:
        E, X = f"{L}.mlp.experts.local_experts.{{expert}}", "layers.{layer}.mlp.experts.{expert}"
        rows += [
            Mapping(f"{L}.mlp.router.weight", ("layers.{layer}.mlp.gate.weight",), "rename", "moe"),
            Mapping(f"{E}.linear_fc1.weight", (f"{X}.gate_proj.weight", f"{X}.up_proj.weight"),
                    "gate_up", "moe"),
            Mapping(f"{E}.linear_fc2.weight", (f"{X}.down_proj.weight",), "rename", "moe"),
        ]
    return rows


def hf_names_for(shape: Qwen3Shape) -> list[str]:
    """Every HF tensor name a checkpoint of this shape must contain, in file order."""
    names = []
    for m in qwen3_mappings(shape):
        layers = range(shape.num_layers) if "{layer}" in m.mcore else [None]
        for layer in (l for l in layers if m.applies_to(shape, l)):
            experts = range(shape.num_experts) if "{expert}" in m.mcore else [None]
            for expert in experts:
                names += m.hf_names(layer=layer, expert=expert)
    return names


def find_mapping(mappings: list[Mapping], mcore_name: str) -> tuple[Mapping, dict[str, int]]:
    for m in mappings:
        match = m.regex().match(mcore_name)
        if match:
            return m, {k: int(v) for k, v in match.groupdict().items()}
    raise KeyError(f"no conversion rule for megatron-core parameter {mcore_name!r}")


def merge(kind: str, tensors: list[torch.Tensor], shape: Qwen3Shape) -> torch.Tensor:
    """HF tensor(s) (or matching TP slices of them) -> the megatron-core tensor (slice)."""
    if kind in ("rename", "vocab"):
        (t,) = tensors
        return t
    if kind == "gate_up":
        return torch.cat(tensors, dim=0)
    if kind == "qkv":
        q, k, v = tensors
        groups = k.shape[0] // shape.head_dim
        rest = q.shape[1:]
        return torch.cat([t.reshape(groups, -1, *rest) for t in (q, k, v)], dim=1).reshape(-1, *rest)
    raise ValueError(f"unknown transform {kind!r}")


def split(kind: str, tensor: torch.Tensor, shape: Qwen3Shape) -> list[torch.Tensor]:
    """A whole (TP=1) megatron-core tensor -> its HF tensor(s); inverse of :func:`merge`."""
    if kind == "rename":
        return [tensor]
    if kind == "vocab":
        return [tensor[: shape.vocab_size]]
    if kind == "gate_up":
        return list(tensor.chunk(2, dim=0))
    if kind == "qkv":
        g, hpg, d = shape.num_kv_heads, shape.num_heads // shape.num_kv_heads, shape.head_dim
        rest = tensor.shape[1:]
        q, k, v = tensor.reshape(g, (hpg + 2) * d, *rest).split([hpg * d, d, d], dim=1)
        return [t.reshape(-1, *rest) for t in (q, k, v)]
    raise ValueError(f"unknown transform {kind!r}")
