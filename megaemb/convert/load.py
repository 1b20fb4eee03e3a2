"""Build this rank's ``EmbeddingModel`` from an HF directory or a megaemb MCore checkpoint."""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

from megaemb import checkpoint, tasks
from megaemb.config import LoRAConfig
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
    lora: LoRAConfig | None = None  # adapters on the model (``megaemb.model.lora``)
    task: tasks.Task = tasks.EMBEDDING  # what the model was built for (its head)


def hf_files_dir(path: str) -> str:
    """The HF config/tokenizer directory of a model path (HF dir, or a megaemb checkpoint's hf/)."""
    return os.path.join(path, "hf") if checkpoint.is_checkpoint(path) else path


def load_model(path: str, parallel, *, bf16: bool = False, attention: str = "auto",
               recompute_granularity: str | None = None, recompute_method: str = "uniform",
               recompute_num_layers: int = 1, load_weights: bool = True,
               hidden_dropout: float = 0.0, attention_dropout: float = 0.0,
               lora: LoRAConfig | None = None, seed: int = 0,
               allow_changed_base: bool = False, task: tasks.Task | None = None) -> LoadedModel:
    """Collective over all ranks. ``path``: HF model dir or megaemb checkpoint dir; a LoRA
    checkpoint loads its base model (``lora.json``; refused if its weights changed since
    training, unless ``allow_changed_base``), then its adapters. ``lora``: add fresh
    adapters (seeded by ``seed``) to the loaded model and freeze the rest. ``task``: what to
    build (its head and output layer); None = a checkpoint's recorded task, or an embedder; a
    checkpoint recorded for another task is refused."""
    from megaemb.model.lora import apply_lora, is_lora_name

    is_mcore = checkpoint.is_checkpoint(path)
    if is_mcore and task is not None:
        checkpoint.check_task(path, task.name, "--model")
    task = tasks.get(checkpoint.read_task(path)) if is_mcore else task or tasks.EMBEDDING
    meta = checkpoint.read_lora(path) if is_mcore else None
    if meta:
        if lora is not None:
            raise ValueError(f"{path} is a LoRA checkpoint: give it as --load (resume), or export "
                             "it with --merge_lora true and train from that")
        checkpoint.check_lora_base(path, "--model", allow_changed_base)
        lora = LoRAConfig.from_json(meta["lora"])
        loaded = load_model(meta["base"], parallel, bf16=bf16, attention=lora.attention(attention),
                            recompute_granularity=recompute_granularity,
                            recompute_method=recompute_method,
                            recompute_num_layers=recompute_num_layers, load_weights=load_weights,
                            hidden_dropout=hidden_dropout, attention_dropout=attention_dropout,
                            task=task)
        apply_lora(loaded.model, lora, init=False)
        if load_weights:
            adapters = {k: v for k, v in loaded.model.sharded_state_dict().items() if is_lora_name(k)}
            loaded.model.load_state_dict(checkpoint.load_checkpoint(path, adapters), strict=False)
        return replace(loaded, hf_dir=hf_files_dir(path), is_mcore=True, lora=lora)
    if lora is not None:
        attention = lora.attention(attention)
    hf_dir = hf_files_dir(path)
    hf_config = read_hf_config(hf_dir)
    shape = Qwen3Shape.from_hf(hf_config, os.path.join(hf_dir, "config.json"))
    check_parallel_layout(shape, parallel, path)
    hf = HFCheckpoint(path, task.output_layer) if load_weights and not is_mcore else None
    config = transformer_config(shape, parallel, bf16=bf16, recompute_granularity=recompute_granularity,
                                recompute_method=recompute_method,
                                recompute_num_layers=recompute_num_layers,
                                attention=attention, hidden_dropout=hidden_dropout,
                                attention_dropout=attention_dropout)
    model = build_model(config, shape, attention=attention, output_layer=task.output_layer,
                        head=task.make_head(hf_dir, shape, config))
    if load_weights:
        if is_mcore:
            sharded = model.sharded_state_dict()
            state = checkpoint.load_checkpoint(path, sharded)
            # a training checkpoint also holds optimizer / scheduler state: take the model's keys
            model.load_state_dict({k: state[k] for k in sharded})
        else:
            load_hf_into_model(model, hf)
    if lora is not None:
        apply_lora(model, lora, seed=seed)
    return LoadedModel(model, shape, hf_config, hf_dir, is_mcore, lora, task)
