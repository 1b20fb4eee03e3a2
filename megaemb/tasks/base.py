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
    output_layer    the weight the head reads, held on the last stage (``output_layer.weight``):
                    None, ``"lm_head"`` (the vocab-parallel output layer ``W``; HF ``lm_head``
                    when untied, else the word embedding) or ``"score"`` (a one-row
                    classifier ``[1, h]`` replicated over TP; HF ``score.weight``)
    train_data      None (the embedding token store and ``GroupLoss``), or ``"module:Class"``
                    built as ``Class(cfg, tokenizer, log)``: rows, per-step micro-batches whose
                    groups stay whole, and each step's loss
    head_rows       output-layer rows its head multiplies each text's last hidden state by
                    (counted in the MFU's FLOPs, ``model.flops.train_flops``)
    causal_lm       its HF export is a ``*ForCausalLM`` (with ``lm_head`` when untied)
    hf_files        ``"module:function"`` of ``(out_dir, config, max_seq_length, seq_cls)``:
                    the files beside an HF export that its users' loaders need (tokenizer
                    changes, sentence-transformers modules), run by global rank 0 once the
                    tokenizer is copied and before ``config`` (the HF config dict, which it may
                    extend) is written; ``config`` None: a PEFT adapter folder
    seq_cls         its HF export is a one-label ``*ForSequenceClassification`` (``score.weight``);
                    an HF directory declaring that architecture converts to this task
    batch_unit      what ``--micro_batch_size`` / ``--global_batch_size`` count, in words for
                    ``--help``, errors and logs
    unsupported     ``(flag, why)`` pairs: ``sft`` (and ``serve``) flags it refuses when set,
                    one line each
    serve_routes    the POST routes ``megaemb serve`` answers for it (the first is the one it
                    names); other tasks' routes are refused with a line saying what it is
    serve_parser    ``"module:function"`` of ``(hf_dir, serve_config, instruction) -> parse``,
                    ``parse(body: bytes) -> serve.Job`` (``serve.RequestError`` for a bad request)
    pair_scorer     None (it embeds texts), or ``"module:Class"`` built as ``Class(model,
                    tokenizer_dir, max_length, instruction)``: ``eval --retriever`` scores
                    (query, candidate) pairs with its ``score`` (collective)
    """

    name: str
    losses: tuple[str, ...]
    head: str | None = None
    output_layer: str | None = None
    head_rows: int = 0
    train_data: str | None = None
    causal_lm: bool = False
    hf_files: str = "megaemb.convert.st_files:embedder_files"
    seq_cls: bool = False
    batch_unit: str = "groups"
    unsupported: tuple[tuple[str, str], ...] = ()
    serve_routes: tuple[str, ...] = ("/v1/embeddings",)
    serve_parser: str = "megaemb.serve:embeddings_parser"
    pair_scorer: str | None = None

    @property
    def own_data(self) -> bool:
        """Whether ``train_data`` brings the rows, micro-batches, step loss and eval (else the
        shared embedding path: token store, ``GroupLoss``, retrieval / pair metrics)."""
        return self.train_data is not None

    def make_head(self, tokenizer_dir: str, shape, config):
        """The scoring head, or None (pooled embeddings)."""
        return _resolve(self.head)(tokenizer_dir, shape, config) if self.head else None

    @property
    def hf_prefix(self) -> str:
        """Its HF export's base-model prefix (``mapping.hf_key``): ``model.`` in a ``*ForCausalLM``
        or ``*ForSequenceClassification``."""
        return "model." if self.causal_lm or self.seq_cls else ""

    def write_hf_files(self, out_dir: str, config: dict | None, max_seq_length: int,
                       seq_cls: bool = False) -> None:
        _resolve(self.hf_files)(out_dir, config, max_seq_length, seq_cls)

    def make_serve_parser(self, hf_dir: str, serve_config, instruction: str | None):
        """``parse(body) -> serve.Job`` for this task's routes (rank 0 of ``megaemb serve``)."""
        return _resolve(self.serve_parser)(hf_dir, serve_config, instruction)

    def make_train_data(self, cfg, tokenizer, log):
        return _resolve(self.train_data)(cfg, tokenizer, log)

    def make_pair_scorer(self, model, tokenizer_dir: str, max_length: int, instruction: str | None):
        """The pair scorer, or None (an embedder)."""
        if not self.pair_scorer:
            return None
        return _resolve(self.pair_scorer)(model, tokenizer_dir, max_length, instruction)
