"""Reading a megaemb MCore checkpoint without building its model: what both export directions
need (``mcore_to_hf`` writes a plain model's HF tensors, ``adapters`` a LoRA checkpoint's).

The model is built on the ``meta`` device at TP=PP=EP=1 (no weights); its sharded state dict
names every checkpoint tensor, and ``dist_checkpointing.load`` of a partial state dict reads
one tensor kind at a time, resharded from any training layout.
"""
from __future__ import annotations

import dataclasses

import torch
from megatron.core import dist_checkpointing

from megaemb import checkpoint
from megaemb.config import ParallelConfig
from megaemb.convert.mapping import find_mapping, qwen3_mappings, split
from megaemb.model.embedder import EmbeddingModel
from megaemb.model.lora import apply_lora
from megaemb.model.qwen3 import transformer_config
from megaemb.shape import Qwen3Shape


def materialise(sharded):
    """A copy of a (meta) ShardedTensor / factory whose data is an empty CPU tensor to load into."""
    data = sharded.data
    return dataclasses.replace(sharded, data=torch.empty(data.shape, dtype=data.dtype, device="cpu"))


def meta_model(shape: Qwen3Shape, dtype: torch.dtype = torch.float32, lora=None,
               output_layer: str | None = None) -> EmbeddingModel:
    """A weightless TP=PP=EP=1 ``EmbeddingModel`` on the ``meta`` device (with ``lora``'s
    adapters; ``output_layer``: a task's, see ``tasks.Task``): its sharded state dict names
    every checkpoint tensor. Any spec gives the same
    keys; Transformer Engine modules cannot be built on the meta device, so it uses SDPA."""
    config = transformer_config(shape, ParallelConfig(), bf16=dtype == torch.bfloat16, attention="sdpa")
    config.use_cpu_initialization, config.perform_initialization = True, False
    with torch.device("meta"):
        model = EmbeddingModel(config, shape, attention="sdpa", output_layer=output_layer)
        if lora is not None:
            apply_lora(model, lora, init=False)
    return model


def stream_hf_tensors(mcore_dir: str, shape: Qwen3Shape, dtype: torch.dtype,
                      iteration: int | None = None, output_layer: str | None = None):
    """Yield ``(hf_name, tensor)`` for every HF tensor, one checkpoint tensor at a time.

    A checkpoint tensor is what megatron stores under one key: per-layer weights are stacked
    over layers (``decoder.layers.mlp.linear_fc1.weight`` is ``[layers, 2f, h]``), so the
    unit of loading is one weight kind for all layers. (Loading one layer's slice alone is
    not possible in a single process: megatron's torch_dist loader then expects every slice.)
    """
    model = meta_model(shape, dtype, output_layer=output_layer)
    sharded = model.sharded_state_dict()
    groups: dict[str, list[str]] = {}
    for name, _ in model.named_parameters():
        groups.setdefault(sharded[name].key, []).append(name)
    if iteration is None:
        iteration = checkpoint.latest_iteration(mcore_dir)
    iteration_dir = checkpoint.iter_dir(mcore_dir, iteration)
    table = qwen3_mappings(shape, output_layer)
    for names in groups.values():
        loaded = dist_checkpointing.load({n: materialise(sharded[n]) for n in names}, iteration_dir)
        for name in names:
            rule, index = find_mapping(table, name)
            yield from zip(rule.hf_names(**index), split(rule.kind, loaded.pop(name), shape))
