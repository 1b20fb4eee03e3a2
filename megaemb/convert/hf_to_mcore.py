"""Hugging Face safetensors -> this rank's megatron-core parameters, streamed.

Each rank reads only the rows/columns of each HF tensor that its TP/PP/EP shard holds
(``safe_open(...).get_slice``), merges them with the table's transform and copies into its
parameter. Peak memory: this rank's shard + one HF tensor slice.
"""
from __future__ import annotations

import json
import os
import struct
import sys

import torch
from megatron.core import parallel_state
from safetensors import safe_open

from megaemb.convert.mapping import find_mapping, hf_key, hf_names_for, merge, qwen3_mappings
from megaemb.shape import ConversionError, Qwen3Shape, read_hf_config


class HFCheckpoint:
    """Read-only view of an HF safetensors checkpoint (single file or sharded with index).

    Accepts both spellings of tensor names: Qwen3-Embedding's (``layers.0...``) and
    ``*ForCausalLM``'s / ``*ForSequenceClassification``'s (``model.layers.0...``); the head's
    tensor is read only for ``output_layer`` (``tasks.Task.output_layer``): ``"lm_head"``
    (a generative reranker: its untied ``lm_head.weight``) or ``"score"`` (a
    sequence-classification reranker: ``score.weight``, or when absent
    ``convert.reranker.initial_score_weight``).
    """

    def __init__(self, model_dir: str, output_layer: str | None = None):
        self.dir = model_dir
        self.output_layer = output_layer
        self.config = read_hf_config(model_dir)
        self.shape = Qwen3Shape.from_hf(self.config, os.path.join(model_dir, "config.json"))
        index = os.path.join(model_dir, "model.safetensors.index.json")
        single = os.path.join(model_dir, "model.safetensors")
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        elif os.path.isfile(single):
            weight_map = {k: "model.safetensors" for k in _safetensors_keys(single)}
        else:
            raise ConversionError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")
        self.prefix = "model." if any(k.startswith("model.layers.") for k in weight_map) else ""
        self.weight_map = weight_map
        missing = [n for n in hf_names_for(self.shape, output_layer) if not self.has(n)]
        self.initial_score = "score.weight" in missing  # derived (initial_score_weight)
        missing = [n for n in missing if n != "score.weight"]
        if self.initial_score:
            self._check_initial_score()
        if "lm_head.weight" in missing:
            raise ConversionError(f"{model_dir}: no lm_head.weight, and tie_word_embeddings is false: "
                                  "a generative reranker needs the output layer")
        if missing:
            raise ConversionError(f"{model_dir}: {len(missing)} tensor(s) missing, first {missing[0]!r}")
        self._handles: dict[str, object] = {}

    def _check_initial_score(self) -> None:
        """A checkpoint that declares itself a sequence classifier must hold its classifier;
        one with no output layer to derive it from starts from zeros, which is said once."""
        arch = next((a for a in self.config.get("architectures") or []
                     if a.endswith("ForSequenceClassification")), None)
        if arch:
            raise ConversionError(f"{self.dir}: config.json declares {arch} but the weights hold "
                                  "no score.weight (an incomplete export?)")
        if not self.has("lm_head.weight") and not self.shape.tie_word_embeddings \
                and int(os.environ.get("RANK") or 0) == 0:
            print(f"note: {self.dir} has no score.weight and no output layer to derive it from "
                  "(W[yes] - W[no]): the classifier starts from zeros, every score 0 (P = 0.5) "
                  "until trained", file=sys.stderr, flush=True)

    def key(self, name: str) -> str:
        """The stored name of the table's HF tensor ``name`` (prefixed as this checkpoint is)."""
        return hf_key(name, self.prefix)

    def has(self, name: str) -> bool:
        """Whether the checkpoint stores the table's HF tensor ``name``."""
        return self.key(name) in self.weight_map

    def _open(self, name: str):
        file = self.weight_map[self.key(name)]
        if file not in self._handles:
            path = os.path.join(self.dir, file)
            if not os.path.isfile(path):
                raise ConversionError(f"{path}: missing shard (listed in the index for {name!r})")
            _safetensors_keys(path)  # validates header and size before mmap
            self._handles[file] = safe_open(path, framework="pt")
        return self._handles[file]

    def read(self, name: str, dim: int | None = None, part: int = 0, parts: int = 1) -> torch.Tensor:
        """HF tensor ``name``, or its ``part``-th of ``parts`` equal chunks along ``dim``."""
        if name == "score.weight" and self.initial_score:
            from megaemb.convert.reranker import initial_score_weight

            return initial_score_weight(self)
        sl = self._open(name).get_slice(self.key(name))
        full = sl.get_shape()
        if dim is None or parts == 1:
            return sl[:]
        if full[dim] % parts:
            raise ConversionError(f"{name}: dim {dim} of size {full[dim]} not divisible by {parts}")
        n = full[dim] // parts
        index = [slice(None)] * len(full)
        index[dim] = slice(part * n, (part + 1) * n)
        return sl[tuple(index)]

    def rows(self, name: str, indices: list[int]) -> torch.Tensor:
        """Rows ``indices`` of the 2-D HF tensor ``name`` (only those are read)."""
        sl = self._open(name).get_slice(self.key(name))
        return torch.cat([sl[i:i + 1] for i in indices])

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype of HF tensor ``name``."""
        return self._open(name).get_slice(self.key(name))[0:1].dtype

    def tensor_shape(self, name: str) -> list[int]:
        return list(self._open(name).get_slice(self.key(name)).get_shape())


def _safetensors_keys(path: str) -> list[str]:
    """Tensor names in a safetensors file, checking the file is complete (not truncated)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ConversionError(f"{path}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", raw)
        if 8 + n > size:
            raise ConversionError(f"{path}: truncated safetensors file (header says {n} bytes)")
        try:
            header = json.loads(f.read(n))
        except json.JSONDecodeError:
            raise ConversionError(f"{path}: corrupt safetensors header") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise ConversionError(f"{path}: truncated safetensors file ({size} bytes, needs {8 + n + end})")
    return [k for k in header if k != "__metadata__"]


def _tp_of(rule) -> tuple[int, int]:
    """(rank, size) of the group that splits a table row's parameter: expert-tensor-parallel
    for expert weights, tensor-parallel otherwise (from the table, not parameter attributes,
    which differ between layer specs)."""
    if rule.is_expert:
        return (parallel_state.get_expert_tensor_parallel_rank(),
                parallel_state.get_expert_tensor_parallel_world_size())
    return (parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_world_size())


def global_index(model, local: dict[str, int]) -> dict[str, int]:
    """Translate a stage-local layer / EP-local expert index to the checkpoint's global one."""
    out = dict(local)
    if "layer" in local:
        out["layer"] = model.decoder.layers[local["layer"]].layer_number - 1
    if "expert" in local:
        per_rank = model.shape.num_experts // parallel_state.get_expert_model_parallel_world_size()
        out["expert"] = parallel_state.get_expert_model_parallel_rank() * per_rank + local["expert"]
    return out


@torch.no_grad()
def load_hf_into_model(model, ckpt: HFCheckpoint) -> None:
    """Fill every parameter of this rank's ``EmbeddingModel`` (any layer spec: TE or local)
    from the HF checkpoint."""
    shape = ckpt.shape
    if shape != model.shape:
        raise ConversionError(f"{ckpt.dir}: model shape differs from the one built")
    table = qwen3_mappings(shape, ckpt.output_layer)
    for name, param in model.named_parameters():
        rule, local = find_mapping(table, model.checkpoint_source(name))
        index = global_index(model, local)
        hf_names = rule.hf_names(**index)
        rank, size = _tp_of(rule)
        dim = rule.tp_dim  # the table's split, whatever the spec's modules record
        if rule.kind == "vocab":
            value = _vocab_slice(ckpt, hf_names[0], shape, rank, size)
        else:
            value = merge(rule.kind, [ckpt.read(n, dim, rank, size) for n in hf_names], shape)
        if tuple(value.shape) != tuple(param.shape):
            raise ConversionError(f"{ckpt.dir}: {'+'.join(hf_names)} gives shape {tuple(value.shape)}, "
                                  f"megatron-core {name} on this rank needs {tuple(param.shape)}")
        param.copy_(value)


def _vocab_slice(ckpt: HFCheckpoint, name: str, shape: Qwen3Shape, rank: int, size: int) -> torch.Tensor:
    """Rows ``[rank*Vp/tp, (rank+1)*Vp/tp)`` of the zero-padded ``[Vp, h]`` embedding."""
    v, h = ckpt.tensor_shape(name)
    if v != shape.vocab_size:
        raise ConversionError(f"{ckpt.dir}: {name} has {v} rows, config vocab_size is {shape.vocab_size}")
    per = shape.padded_vocab_size // size
    start, stop = rank * per, (rank + 1) * per
    sl = ckpt._open(name).get_slice(ckpt.key(name))
    out = torch.zeros(per, h, dtype=sl[0:1].dtype)
    if start < v:
        out[: min(stop, v) - start] = sl[start:min(stop, v)]
    return out
