"""Build this rank's ``EmbeddingModel`` from an HF directory or a megaemb MCore checkpoint."""
from __future__ import annotations

import os
from dataclasses import dataclass

from megaemb import checkpoint
from megaemb.convert.hf_to_mcore import HFCheckpoint, load_hf_into_model, read_hf_config
from megaemb.model.embedder import EmbeddingModel, build_model
from megaemb.model.qwen3 import transformer_config
from megaemb.shape import Qwen3Shape, check_parallel_layout


@dataclass
class LoadedModel:
    model: EmbeddingModel
    shape: Qwen3Shape
    hf_config: dict
    hf_dir: str  # where config.json and the tokenizer live
    is_mcore: bool


def hf_files_dir(path: str) -> str:
    """The HF config/tokenizer directory of a model path (HF dir, or a megaemb checkpoint's hf/)."""
    return os.path.join(path, "hf") if checkpoint.is_checkpoint(path) else path


def load_model(path: str, parallel, *, bf16: bool = False, attention: str = "auto",
               recompute_granularity: str | None = None, load_weights: bool = True) -> LoadedModel:
    """Collective over all ranks. ``path``: HF model dir or megaemb checkpoint dir."""
    is_mcore = checkpoint.is_checkpoint(path)
    hf_dir = hf_files_dir(path)
    hf_config = read_hf_config(hf_dir)
    shape = Qwen3Shape.from_hf(hf_config, os.path.join(hf_dir, "config.json"))
    check_parallel_layout(shape, parallel, path)
    hf = HFCheckpoint(path) if load_weights and not is_mcore else None
    config = transformer_config(shape, parallel, bf16=bf16, recompute_granularity=recompute_granularity,
                                attention=attention)
    model = build_model(config, shape, attention=attention)
    if load_weights:
        if is_mcore:
            sharded = model.sharded_state_dict()
            state = checkpoint.load_checkpoint(path, sharded)
            # a training checkpoint also holds optimizer / scheduler state: take the model's keys
            model.load_state_dict({k: state[k] for k in sharded})
        else:
            load_hf_into_model(model, hf)
    return LoadedModel(model, shape, hf_config, hf_dir, is_mcore)
