"""LoRA adapters on megatron-core's tensor-parallel linears (``--train_type lora``).

A targeted linear ``y = W x`` becomes ``y = W x + (alpha / r) * B A dropout(x)`` with ``W``
frozen, ``A [r, in]`` and ``B [out, r]`` trained (A: PEFT's Kaiming-uniform init, drawn on the
whole tensor from a generator seeded by ``--seed`` and the weight's global name, so every
layout starts from the same adapter; B: zeros, so training starts at the base model).

The adapter follows its base layer's tensor-parallel split (tp ranks, SP = sequence parallel):

    column-parallel base (linear_qkv, linear_fc1; W split on out):
        x [s, b, in] (SP: [s/tp, b, in], gathered first; backward splits, since the adapter
        path's input gradient is whole on every rank)
        A [r, in]        replicated; h = A x [s, b, r]
        h                copy_to_tensor_model_parallel_region: backward all-reduces dh
        B [out/tp, r]    split on out, like W; adds to the base's [s, b, out/tp]
    row-parallel base (linear_proj, linear_fc2; W split on in):
        x [s, b, in/tp]
        A [r, in/tp]     split on in, like W; h = reduce_from_tensor_model_parallel_region(A x)
        B [out, r]       replicated; B h [s, b, out] (SP: scattered to [s/tp, b, out])

Under Transformer Engine's spec the adapted linears are megatron's TE wrappers. Their fused
norm (``TELayerNormColumnParallelLinear``: linear_qkv, dense linear_fc1) normalises the input
inside the module, so the adapter must read the *normalised* input: :func:`apply_lora` sets
TE's ``return_layernorm_output = True`` and the adapter takes ``ln_out`` (NeMo's,
Megatron-Bridge's and ms-swift's recipe). ``ln_out`` stays this rank's tokens under SP (the
adapter gathers it like any column input): TE's ``return_layernorm_output_gathered`` would save
that gather, but TE's backward drops the gradient of a gathered ``ln_out`` (TE v2.11
``module/layernorm_linear.py`` L964-965, unchanged on main: ``grad_outputs[1]`` is added only
when not gathered), which would cut the adapters' input gradient. The TP group and the
sequence-parallel flag are read through :func:`tp_group` and :func:`sequence_parallel`, which
hold for megatron's linears and its TE wrappers alike.

Parameter and checkpoint names are the base's plus ``lora_a.weight`` / ``lora_b.weight``
(``...linear_qkv.lora_b.weight``): the base keeps its names, so conversion and checkpoints of
the frozen weights are unchanged. ``linear_fc1``'s B is saved with megatron's SwiGLU factory,
like its weight, so a LoRA checkpoint loads under any TP layout. The adapters of the fused
megatron linears map onto PEFT's per-projection adapters exactly: ``linear_qkv``'s A is
q_proj's, k_proj's and v_proj's A, and its B splits into their B's as W splits
(``convert.mapping.split``); likewise gate_proj / up_proj for ``linear_fc1``.
"""
from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from megaemb.config import LoRAConfig

ROW_PARALLEL = ("linear_proj", "linear_fc2")  # the rest are column-parallel
PEFT_TARGETS = {"linear_qkv": ("q_proj", "k_proj", "v_proj"), "linear_proj": ("o_proj",),
                "linear_fc1": ("gate_proj", "up_proj"), "linear_fc2": ("down_proj",)}


class LoRAMixin:
    """Mixed into a megatron column- / row-parallel linear (local or TE wrapper) by :func:`apply_lora`."""

    lora: LoRAConfig
    lora_row: bool  # row-parallel base
    lora_gated: bool  # the gated MLP's linear_fc1 ([gate; up] rows)

    def forward(self, x, *args, **kwargs):
        out, bias, x = _outputs(super().forward(x, *args, **kwargs), x)
        return out + self.lora_delta(x), bias

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        """Experts (expert tensor parallel size 1, see :func:`apply_lora`) see the dispatched
        tokens ``[t, h]``: no sequence parallelism, and the tensor-parallel ops are no-ops."""
        a, b, group = self.lora_a.weight, self.lora_b.weight, tp_group(self)
        sp = sequence_parallel(self)
        if self.lora_row:  # x [s, b, in/tp]: each rank's dropout masks its own slice
            with tensor_parallel.get_cuda_rng_tracker().fork():
                x = self.lora_dropout(x)
            h = tensor_parallel.reduce_from_tensor_model_parallel_region(F.linear(x, a), group)
            y = F.linear(h, b)
            if sp:
                y = tensor_parallel.scatter_to_sequence_parallel_region(y, group)
        else:  # the same dropout mask on every rank (the default generator is shared over TP)
            if sp:
                x = tensor_parallel.gather_from_sequence_parallel_region(
                    x, tensor_parallel_output_grad=False, group=group)
            h = F.linear(self.lora_dropout(x), a)
            y = F.linear(tensor_parallel.copy_to_tensor_model_parallel_region(h, group), b)
        return y * self.lora.scale

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        base = {k: v for k, v in super().sharded_state_dict(prefix, sharded_offsets, metadata).items()
                if ".lora_" not in k}
        state = {"lora_a.weight": self.lora_a.weight, "lora_b.weight": self.lora_b.weight}
        axis = {"lora_a.weight": 1} if self.lora_row else {"lora_b.weight": 0}
        lora = make_sharded_tensors_for_checkpoint(state, prefix, axis, sharded_offsets,
                                                   tp_group=tp_group(self),
                                                   dp_cp_group=(metadata or {}).get("dp_cp_group"))
        if self.lora_gated:
            key = f"{prefix}lora_b.weight"
            lora[key] = apply_swiglu_sharded_factory(lora[key], sharded_offsets,
                                                     (metadata or {}).get("singleton_local_shards", False))
        return {**base, **lora}


def _outputs(result: tuple, x: torch.Tensor) -> tuple:
    """``(output, bias, adapter input)`` of the base linear's forward. megatron's linears and
    its TE wrappers return ``(out, bias)``; ``TELayerNormColumnParallelLinear`` with
    ``return_layernorm_output`` returns ``((out, ln_out), None)``, or ``(out, bias, ln_out)``
    when TE returns the bias (megatron-core 0.16.1 ``extensions/transformer_engine.py``
    ``TELayerNormColumnParallelLinear.forward``; TE v2.11 ``LayerNormLinear.forward``)."""
    if len(result) == 3:
        return result
    out, bias = result
    if isinstance(out, tuple):
        out, x = out
    return out, bias, x


def tp_group(module):
    """The linear's tensor-parallel group: megatron's TE wrappers keep megatron's group in
    ``_tp_group`` (TE's own ``tp_group`` is None for experts whose communication megatron does
    itself, ``TELinear.__init__``); megatron's linears in ``tp_group``."""
    return module._tp_group if hasattr(module, "_tp_group") else module.tp_group


def sequence_parallel(module) -> bool:
    """Whether the linear's input / output are this rank's slice of the tokens. TE sets
    ``sequence_parallel`` only with a TP size > 1 (expert linears under megatron's explicit
    communication have TE TP size 1); megatron's linears set it for experts too, which see
    dispatched tokens, so their ``is_expert`` excludes them (TE wrappers have no ``is_expert``)."""
    return bool(module.sequence_parallel) and not getattr(module, "is_expert", False)


_CLASSES: dict[type, type] = {}


def _lora_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"LoRA{cls.__name__}", (LoRAMixin, cls), {})
    return _CLASSES[cls]


def is_lora_name(name: str) -> bool:
    return ".lora_a." in name or ".lora_b." in name


def _init_a(shape: tuple[int, int], seed: int, name: str) -> torch.Tensor:
    """PEFT's init of A (``kaiming_uniform_(a=sqrt(5))``) on the whole ``[r, in]`` tensor."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    bound = 1 / math.sqrt(shape[1])  # kaiming_uniform with a=sqrt(5): gain sqrt(1/3) * sqrt(3/fan_in)
    return (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1).mul_(bound).float()


def apply_lora(model, cfg: LoRAConfig, *, seed: int = 0, init: bool = True) -> list[str]:
    """Add adapters to ``model``'s targeted dense linears (of this pipeline stage) and freeze
    every other parameter. Returns the adapted modules' global names
    (``decoder.layers.{global}.self_attention.linear_qkv``)."""
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank() if init else 0
    for p in model.parameters():
        p.requires_grad_(False)
    done = []
    gated = model.config.gated_linear_unit
    for layer in model.decoder.layers:
        if "experts" in cfg.target_modules and hasattr(layer.mlp, "experts"):
            done += _adapt_experts(layer, cfg, seed, init, gated)
        for target in (t for t in cfg.target_modules if t != "experts"):
            owner = "self_attention" if target in ("linear_qkv", "linear_proj") else "mlp"
            module = getattr(getattr(layer, owner), target, None)
            if module is None:
                continue  # an MoE layer has no linear_fc1 / linear_fc2: experts are adapted above
            name = f"decoder.layers.{layer.layer_number - 1}.{owner}.{target}"
            _adapt(module, cfg, name, seed, tp_rank, init, gated=gated and target == "linear_fc1")
            done.append(name)
    if not done:
        raise ValueError(f"--target_modules {' '.join(cfg.target_modules)}: nothing to adapt in "
                         + ("this model (it has no MoE layers)" if cfg.target_modules == ("experts",)
                            else "this pipeline stage's layers"))
    return done


def _adapt_experts(layer, cfg: LoRAConfig, seed: int, init: bool, gated: bool) -> list[str]:
    """Every local expert's linear_fc1 / linear_fc2 (``SequentialMLP``), named by its global
    expert index. Expert tensor parallelism > 1 communicates explicitly in the token
    dispatcher, which the adapters do not follow: refused."""
    experts = layer.mlp.experts
    if not hasattr(experts, "local_experts"):
        raise ValueError(f"--target_modules experts: {type(experts).__name__} keeps its experts in "
                         "grouped weights; LoRA needs SequentialMLP (--attention sdpa)")
    first = experts.local_experts[0].linear_fc1
    if tp_group(first).size() > 1:
        raise ValueError("--target_modules experts needs expert tensor parallel size 1 "
                         "(--tensor_model_parallel_size 1; use --expert_model_parallel_size)")
    offset = experts.ep_group.rank() * experts.num_local_experts if init else 0
    names = []
    for i, expert in enumerate(experts.local_experts):
        prefix = f"decoder.layers.{layer.layer_number - 1}.mlp.experts.local_experts.{offset + i}"
        for target in ("linear_fc1", "linear_fc2"):
            _adapt(getattr(expert, target), cfg, f"{prefix}.{target}", seed, 0, init,
                   gated=gated and target == "linear_fc1")
            names.append(f"{prefix}.{target}")
    return names


def _adapt(module, cfg: LoRAConfig, name: str, seed: int, tp_rank: int, init: bool, gated: bool):
    row = name.rsplit(".", 1)[-1] in ROW_PARALLEL
    out_local, in_local = module.weight.shape
    in_full = in_local * tp_group(module).size() if row and init else in_local
    like = dict(device=module.weight.device, dtype=module.weight.dtype)
    a = torch.nn.Linear(in_local, cfg.rank, bias=False, **like)
    b = torch.nn.Linear(cfg.rank, out_local, bias=False, **like)
    with torch.no_grad():
        if init:
            full = _init_a((cfg.rank, in_full), seed, name)
            a.weight.copy_(full[:, tp_rank * in_local:(tp_rank + 1) * in_local] if row else full)
            b.weight.zero_()
    split = a.weight if row else b.weight
    set_tensor_model_parallel_attributes(split, True, 1 if row else 0, 1)
    for p in (a.weight, b.weight):  # experts' weights: reduced over expert-data-parallel ranks only
        p.allreduce = getattr(module.weight, "allreduce", True)
    module.__class__ = _lora_class(type(module))
    module.lora, module.lora_row, module.lora_gated = cfg, row, gated
    module.lora_a, module.lora_b = a, b
    module.lora_dropout = torch.nn.Dropout(cfg.dropout) if cfg.dropout else torch.nn.Identity()
    if hasattr(module, "return_layernorm_output"):  # TE's LayerNormLinear: feed the adapter ln_out
        module.return_layernorm_output = True


@torch.no_grad()
def merge_delta(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``weight + scale * b @ a`` computed in fp32, cast once to ``weight``'s dtype."""
    return (weight.float() + scale * (b.float() @ a.float())).to(weight.dtype)
