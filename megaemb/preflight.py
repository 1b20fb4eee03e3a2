"""Checks of a command's inputs that need no model and no process group.

``cli.check_args`` runs them in the launcher before any rank starts, so a mistake costs one
line and no model load; the ranks run the same functions again (cheap, and the only check
when ranks are started by an outside torchrun). Every check raises ``ValueError``,
``FileNotFoundError`` or ``FileExistsError`` with a one-line message naming the flag and path.

Rules that keep data safe:
  * ``--load`` must be a megaemb checkpoint with a completed save (never a silent fresh start).
  * ``--save DIR`` holding a run resumes it (``--load`` defaults to ``--save``); a fresh run
    (``--finetune``, or ``--load`` of another run) over it is refused, and so is a ``--save``
    that holds a model or another tool's run.
  * An output is never the input, nor a directory that contains the input.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import tempfile

from megaemb import checkpoint, outputs, platform

RUN_FILES = ("hf_model", "tensorboard", "curves.png", "config.json", "model.safetensors",
             "model.safetensors.index.json")
RUN_MARKER = "megaemb-run.txt"  # written by sft into --save at start (logs.TrainLogger)
EARLY_FILES = {RUN_MARKER, outputs.LOCK_NAME, "tensorboard", "curves.png"}  # all a run stopped before its first save leaves


def _real(path: str) -> str:
    return os.path.realpath(os.path.expanduser(path))


def contains(outer: str, inner: str) -> bool:
    """Whether path ``inner`` is ``outer`` or lies inside it."""
    outer, inner = _real(outer), _real(inner)
    return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


def check_writable_dir(path: str, flag: str) -> None:
    """``path`` is a directory or can be created as one, and is writable. ``flag`` starts the
    message (``--save out/``)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise FileExistsError(f"{flag}: {path} exists and is not a directory")
    existing = _real(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise FileExistsError(f"{flag}: {existing} is not a directory")
    try:  # a real write: root ignores permission bits, read-only mounts do not
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as e:
        raise PermissionError(f"{flag}: {existing} is not writable ({e.strerror})") from None


def check_free_space(path: str, shape, bf16: bool, flag: str) -> None:
    """Enough free space under ``path`` for one training checkpoint (weights in the model's
    dtype, fp32 main params and two Adam moments: 12 bytes) plus its HF export; else
    ``OSError`` before training starts (a full disk mid-save never corrupts the previous
    checkpoint, see ``checkpoint.save_checkpoint``, but would waste the run up to it)."""
    existing = _real(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    width = 2 if bf16 else 4
    need = shape.num_parameters() * (width + 12 + width)
    free = shutil.disk_usage(existing).free
    if free < need:
        raise OSError(f"{flag}: {free / 2**30:.1f} GiB free on {existing}; a checkpoint and its HF "
                      f"export need about {need / 2**30:.1f} GiB")


def check_output_file(path: str, flag: str, inputs: list[tuple[str, str]], overwrite: bool) -> None:
    """``path`` can be written as a new file: not a directory, its directory writable, not one
    of ``inputs`` ((flag, path) pairs; a flag may name several) nor inside one, not inside a
    megaemb checkpoint, and not an existing file unless ``overwrite``."""
    if os.path.isdir(path):
        raise FileExistsError(f"{flag} {path}: is a directory; give a file name")
    check_writable_dir(os.path.dirname(_real(path)), f"{flag} {path}")
    for input_flag, source in inputs:
        if contains(source, path):
            raise FileExistsError(f"{flag} {path}: is or lies inside {input_flag} {source}; "
                                  "writing there would destroy the input")
    parent = os.path.dirname(_real(path))
    while parent != os.path.dirname(parent):
        if checkpoint.is_checkpoint(parent):
            raise FileExistsError(f"{flag} {path}: lies inside the megaemb checkpoint {parent}")
        parent = os.path.dirname(parent)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{flag} {path}: exists (--overwrite true replaces it)")


def check_model(path: str, flag: str = "--model", iteration: int | None = None) -> None:
    """An HF model directory (``config.json``) or a megaemb checkpoint whose ``iteration``
    (default: the latest) is complete."""
    if not path:
        raise ValueError(f"{flag} is required (HF dir or megaemb checkpoint)")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{flag} {path}: no such directory")
    if checkpoint.is_checkpoint(path):
        if iteration is None:
            iteration = checkpoint.latest_iteration(path)
        elif iteration < 0:
            raise ValueError(f"--iteration must be >= 0, got {iteration}")
        checkpoint.verify_iteration(checkpoint.iter_dir(path, iteration))
    elif not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{flag} {path}: neither an HF model (no config.json) nor a megaemb "
                                "checkpoint (no megaemb.json)")


def model_task(path: str):
    """The ``tasks.Task`` a model holds: a megaemb checkpoint's recorded one; an HF dir's from
    its form (``tasks.of_hf_config``): a ``*ForSequenceClassification`` is the seq-cls
    reranker, a ``*ForCausalLM`` the generative reranker unless its sentence-transformers
    ``modules.json`` pools (Qwen3-Embedding ships one; Qwen3-Reranker has none, megaemb's
    reranker export a ``CrossEncoder``'s)."""
    from megaemb import tasks
    from megaemb.shape import read_hf_config

    if checkpoint.is_checkpoint(path):
        return tasks.get(checkpoint.read_task(path))
    modules = os.path.join(path, "modules.json")
    pooled = False
    if os.path.isfile(modules):
        with open(modules) as f:
            pooled = any("Pooling" in m.get("type", "") for m in json.load(f))
    return tasks.of_hf_config(read_hf_config(path), causal_lm_reranker=not pooled)


def exported_reranker(path: str):
    """The reranker task an HF dir declares itself the export of, else None: a
    ``*ForSequenceClassification``, or a sentence-transformers ``CrossEncoder`` (megaemb's
    reranker export). A bare ``*ForCausalLM`` stays readable as an embedder."""
    from megaemb import tasks
    from megaemb.shape import read_hf_config

    if checkpoint.is_checkpoint(path) or not os.path.isfile(os.path.join(path, "config.json")):
        return None
    st = os.path.join(path, "config_sentence_transformers.json")
    cross_encoder = False
    if os.path.isfile(st):
        with open(st) as f:
            cross_encoder = json.load(f).get("model_type") == "CrossEncoder"
    task = tasks.of_hf_config(read_hf_config(path), causal_lm_reranker=cross_encoder)
    return None if task is tasks.EMBEDDING else task


def model_shape(path: str):
    """The ``Qwen3Shape`` of an HF dir or megaemb checkpoint, from its ``config.json``."""
    from megaemb.shape import Qwen3Shape, read_hf_config

    hf_dir = os.path.join(path, "hf") if checkpoint.is_checkpoint(path) else path
    return Qwen3Shape.from_hf(read_hf_config(hf_dir), os.path.join(hf_dir, "config.json"))


def check_layout(path: str, parallel, world: int, dims: list[int] = (), dims_flag: str = "") -> None:
    """``parallel`` splits the model at ``path`` over ``world`` ranks; Matryoshka ``dims``
    fit its hidden size."""
    from megaemb.shape import check_parallel_layout

    shape = model_shape(path)
    check_parallel_layout(shape, parallel, path)
    parallel.check_world_size(world)
    for d in dims:
        if d > shape.hidden_size:
            raise ValueError(f"{dims_flag} {d} is above the model's hidden size {shape.hidden_size}")


def check_datasets(specs: list[str], flag: str) -> None:
    """Every ``path`` / ``path#N`` of ``specs`` exists (rows are checked when read)."""
    from megaemb.data.formats import parse_spec

    for spec in specs:
        path, _ = parse_spec(spec)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{flag} {spec}: no such file or directory")


def check_eval_datasets(specs: list[str], flag: str) -> None:
    """``check_datasets``, and a BEIR folder comes alone and whole (its queries, corpus and
    qrels belong together)."""
    from megaemb.data.eval_sets import is_beir
    from megaemb.data.formats import parse_spec

    check_datasets(specs, flag)

    folders = [d for d in specs if is_beir(parse_spec(d)[0])]
    if folders and (len(specs) > 1 or "#" in folders[0]):
        raise ValueError(f"{flag} {' '.join(specs)}: a BEIR folder is evaluated alone and whole (no #N "
                         "sampling, no other files)")


def completed_iteration(path: str) -> int | None:
    """The latest completed iteration of a megaemb checkpoint dir, else None."""
    if not (path and checkpoint.is_checkpoint(path)
            and os.path.isfile(os.path.join(path, checkpoint.TRACKER))):
        return None
    return checkpoint.latest_iteration(path)


def resolve_load(cfg) -> str:
    """The checkpoint ``megaemb sft`` resumes from ('' for a fresh run), applying the rules of
    the module docstring; raises on every unsafe combination."""
    load = cfg.load
    if load:
        if not os.path.isdir(load):
            raise FileNotFoundError(f"--load {load}: no such directory")
        if not checkpoint.is_checkpoint(load):
            raise FileNotFoundError(f"--load {load}: not a megaemb checkpoint (no megaemb.json); "
                                    "to start from HF weights, pass them as --model")
        checkpoint.verify_iteration(checkpoint.iter_dir(load, checkpoint.latest_iteration(load)))
        checkpoint.check_task(load, cfg.task_type, "--load")  # before any rank reads the data
    if not cfg.save:
        return load
    check_writable_dir(cfg.save, f"--save {cfg.save}")
    check_free_space(cfg.save, model_shape(cfg.model), platform.default_bf16() if cfg.bf16 is None
                     else cfg.bf16, f"--save {cfg.save}")
    if contains(cfg.save, cfg.model) or contains(cfg.model, cfg.save):
        raise FileExistsError(f"--save {cfg.save}: is, holds or lies inside the --model {cfg.model}; "
                              "pick another directory")
    done = completed_iteration(cfg.save)
    if done is not None:
        if cfg.finetune or (load and _real(load) != _real(cfg.save)):
            raise FileExistsError(
                f"--save {cfg.save}: already holds a run (iteration {done}); resume it with "
                f"--load {cfg.save} and no --finetune, or pick a new --save directory")
        load = cfg.save
    if done is not None:  # resuming --save: a run of another task is never resumed
        checkpoint.check_task(cfg.save, cfg.task_type, "--save")
    if load and not cfg.finetune:
        check_resume(load, cfg)
    if load and cfg.train_type == "lora":
        checkpoint.check_lora_base(load, "--load", cfg.allow_changed_base, base=cfg.model)
    if done is not None:
        return load
    if not checkpoint.is_checkpoint(cfg.save) and os.path.isdir(cfg.save):
        present = set(os.listdir(cfg.save))
        if RUN_MARKER in present and present <= EARLY_FILES:
            return load  # a megaemb run stopped before its first checkpoint: start afresh
        found = [n for n in RUN_FILES if os.path.exists(os.path.join(cfg.save, n))]
        found += [os.path.basename(p) for p in glob.glob(os.path.join(cfg.save, "iter_*"))]
        if found:
            raise FileExistsError(f"--save {cfg.save}: holds {found[0]} but no megaemb checkpoint; "
                                  "pick an empty or new directory")
    return load


def check_resume(load: str, cfg) -> None:
    """The checkpoint to resume is complete and was saved with the same optimizer kind (its
    state's format differs); read from the checkpoint's common state, no model needed."""
    import torch

    iteration = checkpoint.latest_iteration(load)
    path = checkpoint.iter_dir(load, iteration)
    checkpoint.verify_iteration(path)
    common = torch.load(os.path.join(path, "common.pt"), map_location="cpu", weights_only=False)
    saved = (common.get("layout") or {}).get("distributed_optimizer")
    if saved is not None and saved != cfg.use_distributed_optimizer:
        raise ValueError(
            f"--load {load}: saved with --use_distributed_optimizer {str(saved).lower()}; resume "
            "with the same setting (any TP/PP/EP/DP layout works), or take its weights only with "
            "--finetune true")
    from megaemb.config import LoRAConfig

    checkpoint.check_lora_matches(load, LoRAConfig.of(cfg).to_json() if cfg.train_type == "lora" else None)
    if "iteration" in common and int(common["iteration"]) > cfg.train_iters > 0:
        raise ValueError(f"--load {load} is at iteration {int(common['iteration'])}, past "
                         f"--train_iters {cfg.train_iters}")


def check_export_dirs(source: str, output_dir: str, source_flag: str, overwrite: bool) -> None:
    """``export``: the output neither is nor contains the input, nor is part of a checkpoint;
    an existing non-empty output needs ``--overwrite true``."""
    check_writable_dir(output_dir, f"--output_dir {output_dir}")
    if contains(output_dir, source):
        raise FileExistsError(f"--output_dir {output_dir}: is or contains {source_flag} {source}; "
                              "writing there would destroy the input")
    parent = os.path.dirname(_real(output_dir))
    name = os.path.basename(_real(output_dir))
    if checkpoint.is_checkpoint(parent) and re.fullmatch(r"hf|iter_\d+(\.tmp)?", name):
        raise FileExistsError(f"--output_dir {output_dir}: is part of the checkpoint {parent}")
    if not overwrite and os.path.isdir(output_dir) and os.listdir(output_dir):
        raise FileExistsError(f"--output_dir {output_dir}: exists and is not empty "
                              "(--overwrite true replaces a megaemb export)")
    outputs.check_replaceable(output_dir, "--output_dir")
