"""megaemb MCore checkpoint -> HF safetensors + config + tokenizer + sentence-transformers files.

Streamed (``convert.mcore_read``): the model is built on the ``meta`` device (no weights);
each checkpoint tensor is read on its own (``dist_checkpointing.load`` of a partial sharded
state dict, resharded to TP=PP=EP=1), split into HF tensors by the conversion table and
appended to the current output shard, which is written as soon as it is full. Peak memory: the largest checkpoint tensor (one
weight kind stacked over layers) + one output shard. Every rank reads (the load is collective); only
global rank 0 writes.
"""
from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from megaemb import checkpoint, tasks
from megaemb.convert.adapters import merged_hf_tensors
from megaemb.convert.hf_to_mcore import read_hf_config
from megaemb.convert.mapping import hf_key
from megaemb.convert.mcore_read import stream_hf_tensors
from megaemb.convert.reranker import score_token_ids, seq_cls_config, seq_cls_tensors
from megaemb.shape import Qwen3Shape

# what the official Qwen3-Embedding checkpoints declare (their weights have no ``model.``
# prefix and no lm_head, as ours): vLLM serves them with ``--runner pooling``, and
# transformers' AutoModel / sentence-transformers load the base model by ``model_type``
ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class ShardWriter:
    """Collects tensors into shards of at most ``max_bytes`` and writes each when full.

    Shards are written as ``model-0000i.safetensors.part`` and renamed by :meth:`close` to
    ``model.safetensors`` (one shard) or ``model-0000i-of-0000n.safetensors`` + index."""

    def __init__(self, out_dir: str, max_bytes: int, write: bool = True):
        self.out_dir, self.max_bytes, self.write = out_dir, max_bytes, write
        self.current: dict[str, torch.Tensor] = {}
        self.size = 0
        self.parts: list[list[str]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.current and self.size + nbytes > self.max_bytes:
            self._flush()
        self.current[name] = tensor.contiguous()
        self.size += nbytes
        self.total += nbytes

    def _part(self, i: int) -> str:
        return os.path.join(self.out_dir, f"model-{i + 1:05d}.safetensors.part")

    def _flush(self) -> None:
        if self.write:
            save_file(self.current, self._part(len(self.parts)), metadata={"format": "pt"})
        self.parts.append(list(self.current))
        self.current, self.size = {}, 0

    def close(self) -> list[str]:
        self._flush()
        n = len(self.parts)
        files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                                                      for i in range(n)]
        if not self.write:
            return files
        mode = 0o666 & ~_umask()  # safetensors writes owner-only files: share them like the rest
        for i, file in enumerate(files):
            os.chmod(self._part(i), mode)
            os.replace(self._part(i), os.path.join(self.out_dir, file))
        if n > 1:
            weight_map = {name: file for file, names in zip(files, self.parts) for name in names}
            with open(os.path.join(self.out_dir, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": self.total}, "weight_map": weight_map}, f, indent=2)
        return files


def write_hf_model(mcore_dir: str, out_dir: str, *, iteration: int | None = None,
                   dtype: torch.dtype = torch.float32, max_shard_bytes: int = 5 * 2**30,
                   max_seq_length: int = 8192, seq_cls: bool = False) -> None:
    """Collective. Everything ``AutoModel`` and sentence-transformers need (the task's
    ``hf_files``), into ``out_dir``
    (which must exist), from ``iteration`` (default: the latest); written by global rank 0.
    A LoRA checkpoint is written merged (``convert.adapters``). A causal-LM task's checkpoint
    (the generative reranker) becomes a stock ``*ForCausalLM`` (``model.`` prefix, ``lm_head``
    when untied, the tokenizer as it was), or with ``seq_cls`` its
    ``*ForSequenceClassification`` (``convert.reranker``); a seq-cls task's checkpoint (the
    ``reranker``) always its ``*ForSequenceClassification`` (``score.weight`` as trained)."""
    hf_dir = os.path.join(mcore_dir, "hf")
    hf_config = read_hf_config(hf_dir)
    shape = Qwen3Shape.from_hf(hf_config, os.path.join(hf_dir, "config.json"))
    task = tasks.get(checkpoint.read_task(mcore_dir))
    if seq_cls and not (task.causal_lm or task.seq_cls):
        raise ValueError(f"--to_seq_cls: {mcore_dir} is a checkpoint of --task_type "
                         f"{task.name}, not a generative reranker")
    write = not dist.is_initialized() or dist.get_rank() == 0
    writer = ShardWriter(out_dir, max_shard_bytes, write)
    if checkpoint.read_lora(mcore_dir):  # adapters merged into their base
        tensors = merged_hf_tensors(mcore_dir, shape, dtype, iteration, task.output_layer)
    else:
        tensors = stream_hf_tensors(mcore_dir, shape, dtype, iteration, task.output_layer)
    if seq_cls and task.causal_lm:
        tensors = seq_cls_tensors(tensors, shape, *score_token_ids(hf_dir))
    for name, tensor in tensors:
        writer.add(hf_key(name, task.hf_prefix), tensor)
    writer.close()
    if not write:
        return
    checkpoint.copy_hf_files(hf_dir, out_dir)
    config = dict(hf_config)
    config["architectures"] = [ARCHITECTURES[config["model_type"]]]
    config["torch_dtype"] = config["dtype"] = str(dtype).removeprefix("torch.")
    if seq_cls or task.seq_cls:
        config = seq_cls_config(config)
    task.write_hf_files(out_dir, config, min(max_seq_length, shape.max_position_embeddings),
                         seq_cls or task.seq_cls)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
