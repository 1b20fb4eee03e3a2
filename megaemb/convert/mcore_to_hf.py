"""A whole (TP=PP=EP=1) megatron-core ``EmbeddingModel`` -> HF safetensors + config + tokenizer
+ sentence-transformers files, written tensor by tensor into size-capped shards."""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

from megaemb.checkpoint import copy_hf_files
from megaemb.convert.mapping import find_mapping, qwen3_mappings, split
from megaemb.convert.st_files import append_end_token, write_st_files

ARCHITECTURES = {"qwen3": "Qwen3Model", "qwen3_moe": "Qwen3MoeModel"}


def hf_state(model):
    """Yield ``(hf_name, tensor)`` for every HF tensor of a whole model (no copies for renames)."""
    table = qwen3_mappings(model.shape)
    for name, param in model.named_parameters():
        rule, index = find_mapping(table, name)
        yield from zip(rule.hf_names(**index), split(rule.kind, param.detach(), model.shape))


def write_hf_weights(model, out_dir: str, max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Write ``model.safetensors`` (or ``model-0000i-of-0000n.safetensors`` + index)."""
    shards, current, size = [], {}, 0
    for name, tensor in hf_state(model):
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor.contiguous()
        size += nbytes
    shards.append(current)
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map = {}
    for file, shard in zip(files, shards):
        save_file(shard, os.path.join(out_dir, file), metadata={"format": "pt"})
        weight_map.update({k: file for k in shard})
    if len(files) > 1:
        total = sum(t.numel() * t.element_size() for s in shards for t in s.values())
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return files


def write_hf_model(model, hf_config: dict, tokenizer_dir: str, out_dir: str,
                   max_shard_bytes: int = 5 * 2**30, max_seq_length: int = 8192) -> None:
    """Everything ``AutoModel`` and ``SentenceTransformer`` need, into ``out_dir`` (must exist)."""
    write_hf_weights(model, out_dir, max_shard_bytes)
    copy_hf_files(tokenizer_dir, out_dir)
    config = dict(hf_config)
    config["architectures"] = [ARCHITECTURES[config["model_type"]]]
    config["torch_dtype"] = config["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    append_end_token(out_dir)
    write_st_files(out_dir, model.shape.hidden_size,
                   min(max_seq_length, model.shape.max_position_embeddings))
