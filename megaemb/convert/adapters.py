"""A LoRA checkpoint's adapters in HF terms: merged into the base's HF tensors, or written as
a PEFT adapter folder that ``peft.PeftModel.from_pretrained(Qwen3Model, DIR)`` loads (a
generative reranker's: ``Qwen3ForCausalLM``, whose output layer, frozen in training, is the
base's).

Adapters are read at TP=PP=1 (resharded on load, any training layout) and mapped onto HF
projections with the conversion table: ``linear_qkv``'s ``B [qkv rows, r]`` splits like its
weight into q_proj / k_proj / v_proj's B, and all three share its ``A [r, h]`` (likewise
gate_proj / up_proj for ``linear_fc1``); ``linear_proj`` and ``linear_fc2`` map one to one.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from safetensors.torch import save_file

from megaemb import checkpoint, tasks
from megaemb.config import LoRAConfig
from megaemb.convert.hf_to_mcore import HFCheckpoint
from megaemb.convert.mapping import find_mapping, hf_key, hf_names_for, qwen3_mappings, split
from megaemb.convert.mcore_read import materialise, meta_model, stream_hf_tensors
from megaemb.model.lora import PEFT_TARGETS, is_lora_name, merge_delta
from megaemb.shape import Qwen3Shape

PEFT_PREFIX = "base_model.model."  # PeftModel around the HF model (Qwen3Model: no ``model.``)


def adapter_hf_tensors(mcore_dir: str, shape: Qwen3Shape, iteration: int | None = None
                       ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """HF weight name (``layers.0.self_attn.q_proj.weight``) -> its adapter ``(A [r, in],
    B [out, r])``, fp32, whole."""
    model = meta_model(shape, lora=LoRAConfig.from_json(checkpoint.read_lora(mcore_dir)["lora"]))
    sharded = {k: materialise(v) for k, v in model.sharded_state_dict().items() if is_lora_name(k)}
    iteration = checkpoint.latest_iteration(mcore_dir) if iteration is None else iteration
    loaded = dist_checkpointing.load(sharded, checkpoint.iter_dir(mcore_dir, iteration))
    table, out = qwen3_mappings(shape), {}
    for key in sorted(k for k in loaded if ".lora_a." in k):
        base = key.replace(".lora_a.weight", ".weight")
        a, b = loaded[key].float(), loaded[key.replace(".lora_a.", ".lora_b.")].float()
        rule, index = find_mapping(table, base)
        for name, part in zip(rule.hf_names(**index), split(rule.kind, b, shape)):
            out[name] = (a, part)
    return out


def base_hf_tensors(base: str, shape: Qwen3Shape, dtype: torch.dtype,
                    output_layer: str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """The base model's HF tensors, one at a time: an HF directory's, or a megaemb checkpoint's
    (streamed through the conversion); ``output_layer``: with the head's tensor
    (``tasks.Task.output_layer``)."""
    if checkpoint.is_checkpoint(base):
        yield from stream_hf_tensors(base, shape, dtype, output_layer=output_layer)
        return
    hf = HFCheckpoint(base, output_layer)
    for name in hf_names_for(shape, output_layer):
        yield name, hf.read(name).to(dtype)


def merged_hf_tensors(mcore_dir: str, shape: Qwen3Shape, dtype: torch.dtype,
                      iteration: int | None = None,
                      output_layer: str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Every HF tensor of the LoRA checkpoint's model: base + (alpha / r) B A, computed in fp32
    from the base's stored weights and cast once to ``dtype``."""
    meta = checkpoint.read_lora(mcore_dir)
    scale = LoRAConfig.from_json(meta["lora"]).scale
    adapters = adapter_hf_tensors(mcore_dir, shape, iteration)
    for name, tensor in base_hf_tensors(meta["base"], shape, torch.float32, output_layer):
        if name in adapters:
            a, b = adapters.pop(name)
            tensor = merge_delta(tensor, a, b, scale)
        yield name, tensor.to(dtype)
    if adapters:
        raise KeyError(f"{mcore_dir}: adapters without a base tensor: {sorted(adapters)[:3]}")


def write_peft_adapter(mcore_dir: str, out_dir: str, shape: Qwen3Shape, *,
                       dtype: torch.dtype = torch.float32, iteration: int | None = None) -> None:
    """``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT's names for Qwen3Model,
    or for a causal-LM task's ``Qwen3ForCausalLM``). Collective: every rank loads (megatron's
    checkpoint load is), global rank 0 writes."""
    meta = checkpoint.read_lora(mcore_dir)
    task = tasks.get(checkpoint.read_task(mcore_dir))
    lora = LoRAConfig.from_json(meta["lora"])
    lora.check_peft_export(mcore_dir)
    adapters = adapter_hf_tensors(mcore_dir, shape, iteration)
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    tensors = {}
    for name, (a, b) in adapters.items():
        module = PEFT_PREFIX + hf_key(name, task.hf_prefix).removesuffix(".weight")
        tensors[f"{module}.lora_A.weight"] = a.to(dtype).clone()  # q/k/v share A: own copies
        tensors[f"{module}.lora_B.weight"] = b.to(dtype).contiguous()
    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM" if task.causal_lm else None,
        "base_model_name_or_path": meta["base"],
        "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
        "target_modules": sorted({t for m in lora.target_modules for t in PEFT_TARGETS[m]}),
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "use_rslora": False,
        "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None,
    }
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
