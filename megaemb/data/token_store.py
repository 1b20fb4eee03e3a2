"""The training set tokenised once into files, opened read-only (memory-mapped) by every rank.

A store is the directory ``<cache>/<key>``, ``key`` a hash of everything that decides its
contents (``StoreSpec``: the bytes of every dataset file, each spec's ``#N``, the loss type,
``bad_rows``, seed, held-out ratio, hard negatives asked for, max length, query instruction,
the tokenizer's files, and ``FORMAT``). Example ``i`` owns ``t = 2 + k`` consecutive texts
(``k`` hard negatives for infonce, 0 for the pair losses), so one example is one contiguous
run of tokens::

    tokens.bin    int32   [T]            every text's ids (instruction, end token) back to back
    offsets.npy   int64   [n * t + 1]    text j of the store = tokens[offsets[j]:offsets[j + 1]]
                                         texts of example i: j = t*i (query), t*i + 1 (doc),
                                         t*i + 2 .. t*i + 1 + k (negatives)
    labels.npy    float64 [n]            labelled losses only
    held_out.jsonl                       ``--split_dataset_ratio``'s eval rows, as text, in split order
    meta.json                            counts and the data report (what the trainer logs)

A build writes into a temporary sibling ``.<key>.tmp-*`` and renames it to ``<key>`` when
complete, so a directory named ``<key>`` is always a whole store: a killed build leaves only
its temporary directory, and of two concurrent builders (nodes sharing the cache) one rename
wins and the other's identical result is dropped. The builder reads the dataset as text
(``load_examples``) but tokenises ``chunk_size`` examples at a time, so token lists never
exist for the whole set; readers never see the training text.

``open_on_every_rank`` is the distributed entry: local rank 0 of every node builds (or
reuses) the store in a fresh process, every other rank waits, and a build error is raised on
all ranks.
"""
from __future__ import annotations

import datetime
import functools
import hashlib
import itertools
import json
import multiprocessing
import os
import pickle
import shutil
import tempfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from megaemb.data.formats import Example, RowReport, load_examples, parse_spec
from megaemb.data.negatives import fixed_negatives
from megaemb.data.tokenize import EmbeddingTokenizer, TokenizedExample, tokenize_examples

FORMAT = 1  # raise when the files or the tokenisation change: old stores then stop matching
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model")
# the other ranks wait this long for their node's build (hours for 10M long rows); a rank that
# dies ends the job through the launcher, so a long wait cannot hide a crash
BUILD_TIMEOUT = datetime.timedelta(hours=24)


@dataclass(frozen=True)
class StoreSpec:
    """What a store is built from; every field (and the files it names) enters its key."""

    datasets: tuple[str, ...]  # specs as given: "path" or "path#N"
    loss_type: str
    bad_rows: str
    seed: int
    split_dataset_ratio: float
    hard_negatives: int | None  # infonce: k, or None for the most any row has
    max_length: int
    query_instruction: str
    tokenizer_dir: str


# ------------------------------------------------------------------------------ key

def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _path_digest(path: str) -> list:
    """A file's digest; a folder's (``save_to_disk``) relative names and digests of all its
    files; a missing path hashes as missing (loading it then fails with its own error)."""
    if os.path.isfile(path):
        return [_file_digest(path)]
    if not os.path.isdir(path):
        return ["missing"]
    files = sorted(os.path.relpath(os.path.join(root, name), path)
                   for root, _, names in os.walk(path) for name in names)
    return [[name, _file_digest(os.path.join(path, name))] for name in files]


def store_key(spec: StoreSpec) -> str:
    """Hex digest naming the store of ``spec``: settings, file contents (not paths)."""
    settings = {k: v for k, v in asdict(spec).items() if k not in ("datasets", "tokenizer_dir")}
    datasets = [[parse_spec(s)[1], _path_digest(parse_spec(s)[0])] for s in spec.datasets]
    tokenizer = [[name, _file_digest(os.path.join(spec.tokenizer_dir, name))]
                 for name in TOKENIZER_FILES if os.path.isfile(os.path.join(spec.tokenizer_dir, name))]
    text = json.dumps({"format": FORMAT, "settings": settings, "datasets": datasets,
                       "tokenizer": tokenizer}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


# ------------------------------------------------------------------------------ build

def _split(examples: list[Example], ratio: float, seed: int) -> tuple[list[Example], list[Example]]:
    """-> (train rows in file order, held-out rows in split order): the first
    ``max(1, int(n * ratio))`` of ``torch.randperm(n)`` seeded by ``seed`` are held out."""
    if ratio <= 0:
        return examples, []
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, int(len(examples) * ratio))
    return [examples[i] for i in sorted(order[n_val:])], [examples[i] for i in order[:n_val]]


def _write_tokens(spec: StoreSpec, examples: list[Example], negatives: list[list[str]], out: str,
                  chunk_size: int, log: Callable[[str], None]) -> dict:
    """``tokens.bin`` and ``offsets.npy`` of the examples, ``chunk_size`` at a time."""
    tok = EmbeddingTokenizer(spec.tokenizer_dir, spec.max_length)
    lengths, every = [np.zeros(1, np.int64)], max(1, len(examples) // 10)
    with open(os.path.join(out, "tokens.bin"), "wb") as f:
        for start in range(0, len(examples), chunk_size):
            end = start + chunk_size
            rows = tokenize_examples(examples[start:end], negatives[start:end], tok, spec.query_instruction)
            texts = [t for r in rows for t in (r.query, r.doc, *r.negatives)]
            lengths.append(np.fromiter(map(len, texts), np.int64, len(texts)))
            ids = np.fromiter(itertools.chain.from_iterable(texts), np.int32, int(lengths[-1].sum()))
            f.write(ids.tobytes())
            if start // every != min(end, len(examples)) // every:
                log(f"  tokenized {min(end, len(examples))}/{len(examples)} examples")
    offsets = np.cumsum(np.concatenate(lengths))
    np.save(os.path.join(out, "offsets.npy"), offsets)
    return {"tokens": int(offsets[-1]), "truncated": tok.truncated}


def _write_store(spec: StoreSpec, out: str, chunk_size: int, log: Callable[[str], None]) -> None:
    examples, report = load_examples(list(spec.datasets), spec.loss_type, bad_rows=spec.bad_rows,
                                     seed=spec.seed)
    examples, held_out = _split(examples, spec.split_dataset_ratio, spec.seed)
    with open(os.path.join(out, "held_out.jsonl"), "w") as f:
        f.writelines(json.dumps(asdict(e)) + "\n" for e in held_out)
    meta = {"format": FORMAT, "examples": len(examples), "k": 0, "held_out": len(held_out),
            "report": {"rows_read": report.rows_read, "skipped": dict(report.skipped),
                       "messages": report.messages}}
    negatives = [[]] * len(examples)  # one shared empty list (read only): 8 bytes a row
    if spec.loss_type == "infonce":
        counts = [len(e.negatives) for e in examples]
        k = max(counts) if spec.hard_negatives is None else spec.hard_negatives
        negatives, topped = fixed_negatives(examples, k, spec.seed)
        meta.update(k=k, negatives_per_row=[min(counts), max(counts)], topped_up=topped)
    else:
        np.save(os.path.join(out, "labels.npy"), np.array([e.label for e in examples], np.float64))
    meta.update(_write_tokens(spec, examples, negatives, out, chunk_size, log))
    with open(os.path.join(out, "meta.json"), "w") as f:  # last: its presence marks a whole store
        json.dump(meta, f)


def build_token_store(spec: StoreSpec, cache: str, log: Callable[[str], None] = print,
                      chunk_size: int = 2048, fresh_process: bool = False) -> str:
    """The path of ``spec``'s store under ``cache``, built now unless it exists. With
    ``fresh_process`` the build runs in a spawned process (``log`` must pickle), so the dataset
    text and the tokenizer's memory go back to the system when it ends instead of staying in
    this process's heap (a training rank's); its errors are raised here."""
    path = os.path.join(cache, store_key(spec))
    if os.path.isdir(path):
        log(f"reusing token store {path}")
        return path
    if fresh_process:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(build_token_store, spec, cache, log, chunk_size).result()
    os.makedirs(cache, exist_ok=True)
    prefix = f".{os.path.basename(path)}.tmp-"
    unfinished = [n for n in os.listdir(cache) if n.startswith(prefix)]
    if unfinished:
        log(f"note: {len(unfinished)} unfinished build(s) of this store in {cache} ({prefix}*): "
            "left by killed runs, or building now; delete them when no run is building")
    tmp = tempfile.mkdtemp(prefix=prefix, dir=cache)
    log(f"building token store {path}")
    try:
        _write_store(spec, tmp, chunk_size, log)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return publish(tmp, path, log)


def publish(tmp: str, path: str, log: Callable[[str], None]) -> str:
    """Rename the finished build ``tmp`` to ``path``; if another builder got there first,
    drop ``tmp`` (the same contents) and use theirs."""
    for name in os.listdir(tmp):  # on disk before the name says complete (power loss)
        fd = os.open(os.path.join(tmp, name), os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    os.chmod(tmp, 0o755)  # mkdtemp's 0o700 would hide the store from other users of the cache
    try:
        os.rename(tmp, path)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isfile(os.path.join(path, "meta.json")):
            raise
        log(f"reusing token store {path} (another process built it meanwhile)")
        return path
    log(f"built token store {path}")
    return path


# ------------------------------------------------------------------------------ read

class TokenStore:
    """A built store, read-only. ``store[i]`` -> ``TokenizedExample`` whose token lists are
    int32 arrays (views of the memory-mapped ``tokens.bin``); ``len(store)`` examples."""

    def __init__(self, path: str):
        meta_path = os.path.join(path, "meta.json")
        if not os.path.isfile(meta_path):
            raise ValueError(f"{path}: not a complete token store (no meta.json)")
        with open(meta_path) as f:
            self.meta = json.load(f)
        self.path = path
        self.texts_per_example = 2 + self.meta["k"]
        self.offsets = np.load(os.path.join(path, "offsets.npy"), mmap_mode="r")
        n_tokens = os.path.getsize(os.path.join(path, "tokens.bin")) // 4
        if self.meta.get("format") != FORMAT or n_tokens != self.offsets[-1] \
                or len(self.offsets) != len(self) * self.texts_per_example + 1:
            raise ValueError(f"{path}: damaged token store (format or sizes do not match); delete it")
        # np.memmap cannot map an empty file
        self.tokens = (np.memmap(os.path.join(path, "tokens.bin"), np.int32, mode="r") if n_tokens
                       else np.zeros(0, np.int32))
        labels = os.path.join(path, "labels.npy")
        self.labels = np.load(labels, mmap_mode="r") if os.path.isfile(labels) else None

    def __len__(self) -> int:
        return self.meta["examples"]

    def __getitem__(self, i: int) -> TokenizedExample:
        if not 0 <= i < len(self):
            raise IndexError(f"example {i} of {len(self)}")
        j = int(i) * self.texts_per_example
        edges = self.offsets[j: j + self.texts_per_example + 1]
        texts = [self.tokens[a:b] for a, b in zip(edges[:-1], edges[1:])]
        label = None if self.labels is None else float(self.labels[i])
        return TokenizedExample(texts[0], texts[1], texts[2:], label)

    @property
    def report(self) -> RowReport:
        """What the build read and skipped (``report.summary()``, ``report.messages``)."""
        r = self.meta["report"]
        return RowReport(r["rows_read"], Counter(r["skipped"]), r["messages"])

    def held_out(self, limit: int = 0) -> list[Example]:
        """The first ``limit`` (0: all) held-out rows of ``--split_dataset_ratio``."""
        out = []
        with open(os.path.join(self.path, "held_out.jsonl")) as f:
            for line in itertools.islice(f, limit or None):
                out.append(Example(**json.loads(line)))
        return out


def _portable(error: BaseException) -> BaseException:
    """``error`` if it survives pickling (to reach the other ranks), else a RuntimeError."""
    try:
        return pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


def _silent(msg: str) -> None:
    pass


def open_on_every_rank(spec: StoreSpec, cache: str, verbose: bool = True) -> TokenStore:
    """Collective over the world: local rank 0 of every node builds or reuses the store (in a
    fresh process), the others wait; a build error is raised on every rank. Every builder must
    find the same key (same files on every node), or all ranks raise ``ValueError``; each rank
    then opens ``<cache>/<key>`` (a node-local cache holds its own node's copy)."""
    group = dist.new_group(backend="gloo", timeout=BUILD_TIMEOUT)
    outcome, error = None, None
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        try:
            log = functools.partial(print, flush=True) if verbose else _silent
            outcome = build_token_store(spec, cache, log, fresh_process=True)
        except Exception as e:
            outcome, error = _portable(e), e
    outcomes = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, outcome, group=group)
    dist.destroy_process_group(group)
    if error is not None:
        raise error
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    if errors:
        raise errors[0]
    keys = sorted({os.path.basename(o) for o in outcomes if o is not None})
    if len(keys) != 1:
        raise ValueError(f"nodes built different token stores {keys} in {cache}: the dataset or "
                         "tokenizer files differ between nodes")
    return TokenStore(os.path.join(cache, keys[0]))
