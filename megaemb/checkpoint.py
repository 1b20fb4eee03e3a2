"""megaemb checkpoints: megatron-core distributed checkpoints plus what rebuilds the model.

Layout of a checkpoint directory (same for ``export --to_mcore`` and training saves)::

    DIR/megaemb.json                     format marker and version
    DIR/hf/                              HF config.json + tokenizer files (rebuild the model)
    DIR/iter_0000100/                    megatron dist-checkpoint (torch_dist), layout-free
    DIR/latest_checkpointed_iteration.txt

Atomicity: an iteration is written to ``iter_XXXXXXX.tmp`` and renamed when every rank has
finished; ``latest_checkpointed_iteration.txt`` is replaced (``os.replace``) only after that,
so a crash mid-save leaves the previous iteration loadable.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil

import torch.distributed as dist

from megaemb import tasks
from megaemb.outputs import atomic_file

FORMAT = {"format": "megaemb-mcore", "version": 2}  # + "task"; version 1 (no task) is an embedder
TRACKER = "latest_checkpointed_iteration.txt"
LORA_FILE = "lora.json"  # a LoRA run's checkpoint: {"base": model dir, "base_fingerprint", "lora": LoRAConfig}
HF_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
            "special_tokens_map.json", "added_tokens.json", "generation_config.json")


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def iter_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def write_atomic(path: str, text: str) -> None:
    with atomic_file(path) as f:
        f.write(text)


def copy_hf_files(src: str, dst: str) -> None:
    """Copy config and tokenizer files (not weights) from an HF model dir."""
    os.makedirs(dst, exist_ok=True)
    for name in HF_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))


def rng_state_object():
    """This rank's RNG states as a megatron ``ShardedObject``: one entry per (PP, TP) rank,
    saved by data-parallel rank 0 (replicas share them)."""
    import random

    import numpy as np
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from megaemb.parallel import rng_state_tensor, rng_states

    state = {"python": random.getstate(), "numpy": np.random.get_state(), **rng_states()}
    state["tracker"] = {k: rng_state_tensor(v) for k, v in state["tracker"].items()}
    return ShardedObject("rng_state", state,
                         (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()),
                         (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
                         replica_id=ps.get_data_parallel_rank(with_context_parallel=True))


def restore_rng_state(state: dict) -> None:
    """Inverse of :func:`rng_state_object` (given the loaded object's data)."""
    import random

    import numpy as np

    from megaemb.parallel import set_rng_states

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    set_rng_states(state)


def read_lora(root: str) -> dict | None:
    """The ``lora.json`` record of a LoRA checkpoint, or None for a full one."""
    path = os.path.join(root, LORA_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


FINGERPRINT_BLOCK = 4096  # bytes read at each sampled place of a weights file
FINGERPRINT_PLACES = 256  # evenly spaced places sampled in a file that is not safetensors


def _weight_files(path: str) -> list[str]:
    """The files holding a model's weights: an HF directory's ``*.safetensors``, or a megaemb
    checkpoint's latest iteration."""
    if is_checkpoint(path):
        path = iter_dir(path, latest_iteration(path))
        return sorted(os.path.join(path, n) for n in os.listdir(path) if os.path.isfile(os.path.join(path, n)))
    return sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".safetensors"))


def _safetensors_tensors(f, size: int) -> tuple[int, list[dict]] | None:
    """(header length, its tensor records) of an open safetensors file; None if malformed."""
    f.seek(0)
    n = int.from_bytes(f.read(8), "little")
    if not 2 <= n <= size - 8:
        return None
    try:
        header = json.loads(f.read(n))
        return n, [header[k] for k in sorted(header) if k != "__metadata__"]
    except (ValueError, TypeError, AttributeError):
        return None


def _sampled_blocks(f, path: str, size: int) -> list[tuple[int, int]]:
    """(offset, length) of what the fingerprint reads of an open weights file: a safetensors
    file's whole header and the first block of every tensor; else evenly spaced blocks."""
    tensors = _safetensors_tensors(f, size) if path.endswith(".safetensors") else None
    if tensors is not None:
        n, records = tensors
        return [(0, 8 + n)] + [(8 + n + int(t["data_offsets"][0]), FINGERPRINT_BLOCK) for t in records]
    step = max(FINGERPRINT_BLOCK, size // FINGERPRINT_PLACES)
    places = [*range(0, size, step), max(0, size - FINGERPRINT_BLOCK)]
    return [(o, FINGERPRINT_BLOCK) for o in places]


def weights_fingerprint(path: str) -> str:
    """A digest of the weights at ``path`` (HF directory or megaemb checkpoint) that changes
    when they change, and only then: copying the folder elsewhere keeps it (no paths, no
    mtimes).

    It hashes, per weights file, its name and size and: for safetensors, the whole header
    (every tensor's name, dtype, shape and place) and the first 4 KiB of every tensor's data;
    for other files (a checkpoint's ``.distcp``), 256 evenly spaced 4 KiB blocks. For an 8B
    model that is about 400 reads of 4 KiB (under 2 MB, well under a second even on a
    network disk), where hashing every byte would read 16 GB at every load. A new revision
    of a model changes every tensor it was trained on, so it changes their first bytes;
    another dtype or shape changes the header. What it misses is an edit that leaves every
    sampled byte in place, which neither training nor conversion makes."""
    h = hashlib.sha256()
    for file in _weight_files(path):
        size = os.path.getsize(file)
        h.update(f"{os.path.basename(file)}\0{size}\0".encode())
        with open(file, "rb") as f:
            for offset, length in _sampled_blocks(f, file, size):
                f.seek(offset)
                h.update(f.read(length))
    return h.hexdigest()[:16]


def check_lora_base(root: str, flag: str, allow_changed: bool, base: str | None = None) -> None:
    """When ``root`` is a LoRA checkpoint: its base model (``base``, default ``lora.json``'s)
    exists and, unless ``allow_changed``, holds the weights the adapters were trained on (the
    fingerprint ``lora.json`` recorded; a checkpoint saved before fingerprints is not
    checked). ``FileNotFoundError`` / ``ValueError`` naming both otherwise."""
    meta = read_lora(root) if is_checkpoint(root) else None
    if not meta:
        return
    base = meta["base"] if base is None else base
    if not os.path.isdir(base):
        raise FileNotFoundError(f"{flag} {root}: its base model {base} is gone (the adapters need it)")
    saved = meta.get("base_fingerprint")
    if allow_changed or not saved:
        return
    now = weights_fingerprint(base)
    if now != saved:
        raise ValueError(f"{flag} {root}: the base model {base} holds other weights than its adapters "
                         f"were trained on (fingerprint {now}, trained on {saved}); restore those "
                         "weights, or pass --allow_changed_base true to use these knowingly")


def check_lora_matches(root: str, lora: dict | None) -> None:
    """A run resuming ``root`` must have its adapter settings (``LoRAConfig.to_json()``, or
    None for full training): ``ValueError`` naming both otherwise."""
    saved = (read_lora(root) or {}).get("lora")
    if saved != lora:
        raise ValueError(f"--load {root}: saved with "
                         + (f"LoRA {saved}" if saved else "--train_type full") + ", this run is "
                         + (f"LoRA {lora}" if lora else "--train_type full")
                         + " (resume with the same adapter flags)")


def read_task(root: str) -> str:
    """The task type (``--task_type``) a checkpoint was trained for (the default task when
    ``megaemb.json`` predates task types)."""
    with open(os.path.join(root, "megaemb.json")) as f:
        return json.load(f).get("task", tasks.DEFAULT)


def check_task(root: str, wanted: str, flag: str) -> None:
    """A checkpoint trained for another task than ``wanted`` is a one-line ValueError."""
    saved = read_task(root)
    if saved != wanted:
        raise ValueError(f"{flag} {root}: a checkpoint of --task_type {saved}, not {wanted}")


def save_checkpoint(root: str, iteration: int, sharded_state_dict: dict, hf_source: str,
                    lora: dict | None = None, task: str = tasks.DEFAULT) -> str:
    """Collective: every rank passes its sharded state dict (a LoRA run: its adapters', and
    ``lora`` = the ``lora.json`` record); ``task``: the task type ``megaemb.json`` records.
    Returns the iteration directory."""
    final, tmp = iter_dir(root, iteration), iter_dir(root, iteration) + ".tmp"
    if _rank0():
        os.makedirs(root, exist_ok=True)
        if not os.path.isfile(os.path.join(root, "megaemb.json")):
            write_atomic(os.path.join(root, "megaemb.json"), json.dumps({**FORMAT, "task": task}))
        if lora is not None:
            write_atomic(os.path.join(root, LORA_FILE), json.dumps(lora, indent=2))
        if os.path.abspath(os.path.join(root, "hf")) != os.path.abspath(hf_source):
            copy_hf_files(hf_source, os.path.join(root, "hf"))
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    from megatron.core import dist_checkpointing

    try:
        dist_checkpointing.save(sharded_state_dict, tmp)
    except BaseException:  # e.g. a full disk: leave no partial iteration taking its space
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _barrier()
    if _rank0():
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        write_atomic(os.path.join(root, TRACKER), str(iteration))
    _barrier()
    return final


def prune_checkpoints(root: str, keep: int) -> list[str]:
    """Rank 0, after a completed save: delete all but the newest ``keep`` iteration directories
    (with their ``_hf`` exports). The newest one is the tracker's, so a crash mid-prune leaves
    a loadable run. Returns the deleted paths."""
    done = sorted(int(m.group(1)) for m in (re.fullmatch(r"iter_(\d{7})", n) for n in os.listdir(root)) if m)
    removed = []
    for iteration in done[:-keep] if keep > 0 else []:
        for path in (iter_dir(root, iteration), iter_dir(root, iteration) + "_hf"):
            if os.path.isdir(path):
                shutil.rmtree(path)
                removed.append(path)
    return removed


def is_checkpoint(root: str) -> bool:
    return os.path.isfile(os.path.join(root, "megaemb.json"))


def latest_iteration(root: str) -> int:
    if not is_checkpoint(root):
        raise FileNotFoundError(f"{root}: not a megaemb checkpoint (no megaemb.json)")
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing; the checkpoint has no completed save")
    text = open(path).read().strip()
    if not text.isdigit():
        raise FileNotFoundError(f"{path}: damaged (expected an iteration number, found {text[:40]!r})")
    return int(text)


def verify_iteration(path: str) -> None:
    """Raise ``FileNotFoundError`` naming the file when an iteration directory is incomplete:
    a missing ``.metadata`` / ``metadata.json`` / ``common.pt``, or a ``.distcp`` file that is
    missing or shorter than the byte ranges its ``.metadata`` records (truncated copy)."""
    import pickle

    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: missing checkpoint iteration directory")
    for name in (".metadata", "metadata.json", "common.pt"):
        if not os.path.isfile(os.path.join(path, name)):
            raise FileNotFoundError(f"{os.path.join(path, name)}: missing; the checkpoint is damaged")
    try:
        with open(os.path.join(path, ".metadata"), "rb") as f:
            metadata = pickle.load(f)
        ranges = [(info.relative_path, info.offset + info.length)
                  for info in metadata.storage_data.values()]
    except Exception as e:  # a truncated or foreign pickle
        raise FileNotFoundError(f"{os.path.join(path, '.metadata')}: unreadable ({type(e).__name__}); "
                                "the checkpoint is damaged") from None
    needed: dict[str, int] = {}
    for file, end in ranges:
        needed[file] = max(end, needed.get(file, 0))
    for file, end in sorted(needed.items()):
        full = os.path.join(path, file)
        if not os.path.isfile(full):
            raise FileNotFoundError(f"{full}: missing; the checkpoint is damaged")
        if os.path.getsize(full) < end:
            raise FileNotFoundError(f"{full}: truncated ({os.path.getsize(full)} bytes, the checkpoint "
                                    f"needs {end}); the checkpoint is damaged")


def saved_layout(root: str, iteration: int | None = None) -> dict | None:
    """The ``layout`` record (parallel sizes) a training save stored, or None."""
    from megatron.core import dist_checkpointing

    iteration = latest_iteration(root) if iteration is None else iteration
    verify_iteration(iter_dir(root, iteration))
    return dist_checkpointing.load_common_state_dict(iter_dir(root, iteration)).get("layout")


# Keys written by earlier megaemb versions -> today's. Up to commit f48286a the local spec
# saved MoE layers' pre-MLP norm under TE's *dense* fused name; today every spec saves it as
# TE's MoE layers do (``pre_mlp_layernorm.weight``).
LEGACY_KEYS = ((".pre_mlp_layernorm.weight", ".mlp.linear_fc1.layer_norm_weight"),)


def _use_legacy_keys(sharded_state_dict: dict, directory: str) -> None:
    """Point requested keys the checkpoint lacks at their legacy spelling, where it has that."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    saved = None
    for item in nested_values(sharded_state_dict):
        key = getattr(item, "key", None)
        if not isinstance(key, str) or not any(new in key for new, _ in LEGACY_KEYS):
            continue
        if saved is None:
            saved = set(dist_checkpointing.load_tensors_metadata(directory))
        if key in saved:
            continue
        for new, old in LEGACY_KEYS:
            if new in key and key.replace(new, old) in saved:
                item.key = key.replace(new, old)


def load_checkpoint(root: str, sharded_state_dict: dict, iteration: int | None = None) -> dict:
    """Collective: load into this rank's shards (any TP/PP/EP layout, any layer spec). Returns
    the state dict."""
    from megatron.core import dist_checkpointing

    iteration = latest_iteration(root) if iteration is None else iteration
    verify_iteration(iter_dir(root, iteration))
    _use_legacy_keys(sharded_state_dict, iter_dir(root, iteration))
    return dist_checkpointing.load(sharded_state_dict, iter_dir(root, iteration))
