"""``megaemb export``: HF -> megaemb MCore checkpoint, and MCore -> HF (+ sentence-transformers).

Both directions write into ``<output_dir>.tmp`` and rename at the end (the temp dir is removed
on failure), so a failed or killed export never leaves ``output_dir`` looking complete. The
finished directory lists every file (relative paths) in ``megaemb-export.json`` (``outputs.MANIFEST``):
``--overwrite`` replaces only such a directory, never files megaemb did not write.
"""
from __future__ import annotations

import contextlib
import os
import shutil

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megaemb import checkpoint, outputs, tasks
from megaemb.config import ParallelConfig
from megaemb.convert.load import load_model
from megaemb.convert.mcore_to_hf import write_hf_model


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _prepare(output_dir: str, overwrite: bool) -> str:
    """Refuse to overwrite a non-empty directory (unless asked) or one holding files megaemb
    did not write; return the temp dir."""
    if not overwrite and os.path.exists(output_dir) and os.listdir(output_dir):
        raise FileExistsError(f"{output_dir}: output directory exists and is not empty")
    outputs.check_replaceable(output_dir, "--output_dir")
    tmp = output_dir.rstrip("/") + ".tmp"
    if _rank0():
        if os.path.lexists(tmp) and not _left_by_export(tmp):
            raise FileExistsError(f"{tmp}: exists and is not an unfinished megaemb export (export "
                                  f"--output_dir {output_dir} builds there): move it")
        shutil.rmtree(tmp, ignore_errors=True)  # an export killed before its end
        os.makedirs(tmp)
        outputs.write_manifest(tmp)  # marks it megaemb's until the finished listing replaces it
    if dist.is_initialized():
        dist.barrier()
    return tmp


def _left_by_export(tmp: str) -> bool:
    """Whether the staging folder ``tmp`` is an export's leftover (marked, or empty)."""
    return os.path.isdir(tmp) and not os.path.islink(tmp) and (
        not os.listdir(tmp) or os.path.isfile(os.path.join(tmp, outputs.MANIFEST)))


def _publish(tmp: str, output_dir: str) -> None:
    if dist.is_initialized():
        dist.barrier()
    if _rank0():
        outputs.write_manifest(tmp)
        if os.path.isdir(output_dir):
            shutil.rmtree(output_dir)  # empty, or a megaemb export (_prepare)
        os.replace(tmp, output_dir)
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def _staged(output_dir: str, overwrite: bool = False):
    """Yield the temp dir to write into; rename it to ``output_dir`` on success, remove it on
    failure."""
    tmp = _prepare(output_dir, overwrite)
    try:
        yield tmp
    except BaseException:
        if _rank0():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish(tmp, output_dir)


def hf_to_mcore(model_dir: str, output_dir: str, parallel: ParallelConfig, bf16: bool = False,
                attention: str = "auto", overwrite: bool = False):
    """Collective. Each rank reads its slices of the HF weights and saves its shard, recorded
    as the task the HF config declares (``tasks.of_hf_config``: a
    ``*ForSequenceClassification`` is a ``reranker``, else an embedder)."""
    from megaemb import tasks
    from megaemb.convert.hf_to_mcore import read_hf_config

    task = tasks.of_hf_config(read_hf_config(model_dir))
    with _staged(output_dir, overwrite) as tmp:
        loaded = load_model(model_dir, parallel, bf16=bf16, attention=attention, task=task)
        checkpoint.save_checkpoint(tmp, 0, loaded.model.sharded_state_dict(), loaded.hf_dir,
                                   task=task.name)
    return loaded


def mcore_to_hf(mcore_dir: str, output_dir: str, bf16: bool = False,
                max_shard_bytes: int = 5 * 2**30, iteration: int | None = None,
                overwrite: bool = False, merge_lora: bool = False, allow_changed_base: bool = False,
                seq_cls: bool = False) -> None:
    """Collective over ranks grouped with TP=PP=EP=1 (extra ranks are data-parallel copies;
    the checkpoint, saved under any layout, is resharded on load one tensor at a time);
    global rank 0 writes the HF directory. A LoRA checkpoint becomes, with ``merge_lora``,
    the merged HF model, else a PEFT adapter folder (either refused when its base's weights
    changed since training, unless ``allow_changed_base``)."""
    if parallel_state.get_model_parallel_group().size() != 1:
        raise ValueError("export --to_hf runs with tensor/pipeline/expert parallel size 1 "
                         "(the MCore checkpoint is resharded on load)")
    if not checkpoint.is_checkpoint(mcore_dir):
        raise FileNotFoundError(f"{mcore_dir}: not a megaemb checkpoint (no megaemb.json)")
    checkpoint.check_lora_base(mcore_dir, "--mcore_model", allow_changed_base)
    dtype = torch.bfloat16 if bf16 else torch.float32
    with _staged(output_dir, overwrite) as tmp:
        if checkpoint.read_lora(mcore_dir) and not merge_lora:
            write_adapter(mcore_dir, tmp, dtype, iteration)
        else:
            write_hf_model(mcore_dir, tmp, iteration=iteration, max_shard_bytes=max_shard_bytes,
                           dtype=dtype, seq_cls=seq_cls)


def write_adapter(mcore_dir: str, out_dir: str, dtype: torch.dtype, iteration: int | None) -> None:
    """The PEFT adapter folder (collective; global rank 0 writes) with the tokenizer, for
    ``PeftModel``."""
    from megaemb.convert.adapters import write_peft_adapter
    from megaemb.convert.hf_to_mcore import read_hf_config
    from megaemb.shape import Qwen3Shape

    hf_dir = os.path.join(mcore_dir, "hf")
    shape = Qwen3Shape.from_hf(read_hf_config(hf_dir), os.path.join(hf_dir, "config.json"))
    write_peft_adapter(mcore_dir, out_dir, shape, dtype=dtype, iteration=iteration)
    if _rank0():
        checkpoint.copy_hf_files(hf_dir, out_dir)
        os.remove(os.path.join(out_dir, "config.json"))  # the base's; PEFT reads adapter_config.json
        # the task's tokenizer files, as the merged export's (an embedder's pooled end token)
        tasks.get(checkpoint.read_task(mcore_dir)).write_hf_files(out_dir, None, 0)
