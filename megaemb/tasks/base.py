"""The ``Task`` bundle: what a model task type (``--task_type``) supplies to the shared code.

Shaped like torchtitan's ``ModelSpec`` and looked up by name as Megatron-Bridge's
``STEP_FUNCTIONS`` (see ``../shared/notes/structure-2026-12.md`` section 3.1): ``train``,
``load``, ``checkpoint`` and ``export`` ask the task for its parts and never test its name.
Parts are given as dotted names of callables (imported on first use), so reading the registry
(``config.validate``) imports no model code.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass


def _resolve(dotted: str):
    module, name = dotted.rsplit(":", 1)
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Task:
    """name            ``--task_type`` value, recorded in ``megaemb.json``
    losses          the ``--loss_type`` values it trains with
    head            None (pooled embeddings), or ``"module:function"`` of
                    ``(tokenizer_dir, shape, config) -> nn.Module`` scoring each text from the
                    final hidden states and the output layer's weight (the last stage's)
    output_layer    whether the model holds the output layer ``W`` (HF ``lm_head`` when untied)
    train_data      None (the embedding token store and ``GroupLoss``), or ``"module:Class"``
                    built as ``Class(cfg, tokenizer, log)``: rows, per-step micro-batches whose
                    groups stay whole, and each step's loss
    head_rows       output-layer rows its head multiplies each text's last hidden state by
                    (counted in the MFU's FLOPs, ``model.flops.train_flops``)
    causal_lm       its HF export is a ``*ForCausalLM`` (with ``lm_head`` when untied)
    unsupported     ``sft`` flags it refuses when set (one line each), for what is not built yet
    """

    name: str
    losses: tuple[str, ...]
    head: str | None = None
    output_layer: bool = False
    head_rows: int = 0
    train_data: str | None = None
    causal_lm: bool = False
    unsupported: tuple[str, ...] = ()

    def make_head(self, tokenizer_dir: str, shape, config):
        """The scoring head, or None (pooled embeddings)."""
        return _resolve(self.head)(tokenizer_dir, shape, config) if self.head else None

    def make_train_data(self, cfg, tokenizer, log):
        return _resolve(self.train_data)(cfg, tokenizer, log)
