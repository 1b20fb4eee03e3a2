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

``tp_dim`` is the dimension tensor (or expert-tensor) parallelism splits: 0 for column-parallel
weights (vocab, qkv, fc1), 1 for row-parallel ones (o_proj, fc2), None for replicated ones
(norms, router). Converters take it from here, never from parameter attributes (Transformer
Engine's expert linears record ``partition_dim`` 0 for ``linear_fc2``, which is split on 1).

Parameter names depend on the layer spec: Transformer Engine fuses the pre-attention norm into
``linear_qkv`` and, in dense layers, the pre-MLP norm into ``linear_fc1``; its grouped-GEMM
experts (``TEGroupedMLP``) hold expert ``e`` of a rank as ``experts.linear_fc1.weight{e}``. The
rows use the unfused, per-expert (local-spec) names; ``FUSED_NORM_ALIASES`` and
``GROUPED_EXPERT`` map the other spellings onto them, so the one table serves every spec in
both directions.

A generative reranker (Qwen3-Reranker, a ``Qwen3ForCausalLM``) also needs the output layer:
``qwen3_mappings(shape, output_layer="lm_head")`` adds megatron's ``output_layer.weight`` <->
``lm_head.weight`` (vocab-padded like the embedding) when the model's embeddings are untied;
tied, the head reads the word embedding and there is no extra tensor either side. A
sequence-classification reranker (``Qwen3ForSequenceClassification``), ``output_layer="score"``:
``output_layer.weight`` <-> ``score.weight`` ``[1, h]``, replicated over TP.
``lm_head.weight`` and ``score.weight`` sit outside the base model: ``hf_key`` never gives them
the ``model.`` prefix.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from megaemb.shape import Qwen3Shape


@dataclass(frozen=True)
class Mapping:
    mcore: str
    hf: tuple[str, ...]
    kind: str = "rename"
    layers: str = "all"  # which decoder layers have it: all | dense | moe
    tp_dim: int | None = None  # dim split by (expert-)tensor parallelism; None = replicated

    def applies_to(self, shape: Qwen3Shape, layer: int | None) -> bool:
        if layer is None or self.layers == "all":
            return True
        return (self.layers == "moe") == shape.is_moe_layer(layer)

    def regex(self) -> re.Pattern:
        pattern = re.escape(self.mcore).replace(r"\{layer\}", r"(?P<layer>\d+)")
        return re.compile("^" + pattern.replace(r"\{expert\}", r"(?P<expert>\d+)") + "$")

    def hf_names(self, **index) -> list[str]:
        return [name.format(**index) for name in self.hf]

    @property
    def is_expert(self) -> bool:
        """Split by the expert-tensor-parallel group (else by the tensor-parallel group)."""
        return "{expert}" in self.mcore


# Transformer Engine spelling of a decoder-layer parameter -> the table's (local-spec) spelling.
FUSED_NORM_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
# TEGroupedMLP (grouped GEMM) spelling of expert e's linear -> SequentialMLP's.
GROUPED_EXPERT = (re.compile(r"\.mlp\.experts\.(linear_fc[12])\.weight(\d+)$"),
                  r".mlp.experts.local_experts.\2.\1.weight")
_LAYER_PARAM = re.compile(r"^(decoder\.layers\.\d+\.)(.*)$")


def canonical_name(mcore_name: str) -> str:
    """The table's spelling of a parameter name from any layer spec (TE or local, grouped
    or sequential experts)."""
    match = _LAYER_PARAM.match(mcore_name)
    if match and match.group(2) in FUSED_NORM_ALIASES:
        return match.group(1) + FUSED_NORM_ALIASES[match.group(2)]
    pattern, replacement = GROUPED_EXPERT
    return pattern.sub(replacement, mcore_name)


# HF tensors outside the base model (``*ForCausalLM``'s / ``*ForSequenceClassification``'s head;
# never ``model.``-prefixed)
HF_TOP_LEVEL = ("lm_head.weight", "score.weight")


def hf_key(name: str, prefix: str) -> str:
    """A table HF name as stored in a checkpoint whose base-model tensors carry ``prefix``
    (``""`` for Qwen3-Embedding's spelling, ``"model."`` for ``*ForCausalLM``'s)."""
    return name if name in HF_TOP_LEVEL else prefix + name


def qwen3_mappings(shape: Qwen3Shape, output_layer: str | None = None) -> list[Mapping]:
    """The table. HF names are without the ``model.`` prefix (Qwen3-Embedding spelling).
    ``output_layer`` (``tasks.Task.output_layer``): add the row of a head's weight:
    ``"lm_head"`` the untied output layer (a generative reranker's), ``"score"`` the one-row
    classifier (a sequence-classification reranker's)."""
    L, A = "decoder.layers.{layer}", "layers.{layer}.self_attn"
    rows = [
        Mapping("embedding.word_embeddings.weight", ("embed_tokens.weight",), "vocab", tp_dim=0),
        Mapping(f"{L}.input_layernorm.weight", ("layers.{layer}.input_layernorm.weight",)),
        Mapping(f"{L}.self_attention.linear_qkv.weight",
                (f"{A}.q_proj.weight", f"{A}.k_proj.weight", f"{A}.v_proj.weight"), "qkv", tp_dim=0),
        Mapping(f"{L}.self_attention.q_layernorm.weight", (f"{A}.q_norm.weight",)),
        Mapping(f"{L}.self_attention.k_layernorm.weight", (f"{A}.k_norm.weight",)),
        Mapping(f"{L}.self_attention.linear_proj.weight", (f"{A}.o_proj.weight",), tp_dim=1),
        Mapping(f"{L}.pre_mlp_layernorm.weight", ("layers.{layer}.post_attention_layernorm.weight",)),
        Mapping(f"{L}.mlp.linear_fc1.weight",
                ("layers.{layer}.mlp.gate_proj.weight", "layers.{layer}.mlp.up_proj.weight"), "gate_up",
                "dense", tp_dim=0),
        Mapping(f"{L}.mlp.linear_fc2.weight", ("layers.{layer}.mlp.down_proj.weight",), "rename", "dense",
                tp_dim=1),
        Mapping("decoder.final_layernorm.weight", ("norm.weight",)),
    ]
    if shape.num_experts:
        E, X = f"{L}.mlp.experts.local_experts.{{expert}}", "layers.{layer}.mlp.experts.{expert}"
        rows += [
            Mapping(f"{L}.mlp.router.weight", ("layers.{layer}.mlp.gate.weight",), "rename", "moe"),
            Mapping(f"{E}.linear_fc1.weight", (f"{X}.gate_proj.weight", f"{X}.up_proj.weight"),
                    "gate_up", "moe", tp_dim=0),
            Mapping(f"{E}.linear_fc2.weight", (f"{X}.down_proj.weight",), "rename", "moe", tp_dim=1),
        ]
    if output_layer == "score":
        rows.append(Mapping("output_layer.weight", ("score.weight",)))
    elif output_layer == "lm_head" and not shape.tie_word_embeddings:
        rows.append(Mapping("output_layer.weight", ("lm_head.weight",), "vocab", tp_dim=0))
    elif output_layer not in (None, "lm_head"):
        raise ValueError(f"unknown output layer {output_layer!r}")
    return rows


def hf_names_for(shape: Qwen3Shape, output_layer: str | None = None) -> list[str]:
    """Every HF tensor name a checkpoint of this shape must contain, in file order."""
    names = []
    for m in qwen3_mappings(shape, output_layer):
        layers = range(shape.num_layers) if "{layer}" in m.mcore else [None]
        for layer in (l for l in layers if m.applies_to(shape, l)):
            experts = range(shape.num_experts) if "{expert}" in m.mcore else [None]
            for expert in experts:
                names += m.hf_names(layer=layer, expert=expert)
    return names


def find_mapping(mappings: list[Mapping], mcore_name: str) -> tuple[Mapping, dict[str, int]]:
    """The row for a megatron-core parameter name of any layer spec, and its ``{layer}`` /
    ``{expert}`` indices."""
    name = canonical_name(mcore_name)
    for m in mappings:
        match = m.regex().match(name)
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
