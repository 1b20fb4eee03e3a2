"""The training set tokenised once into files, opened read-only (memory-mapped) by every rank.

A store is the directory ``<cache>/<key>``, ``key`` a hash of everything that decides its
contents (``StoreSpec``: the bytes of every dataset file, each spec's ``#N``, the loss type,
``bad_rows``, seed, held-out ratio, hard negatives asked for, max length, query instruction,
the tokenizer's files, and ``FORMAT``). Every valid row of every file is tokenised once, in
file order (query with its instruction, response, its negatives; each text ends with the end
token); example ``i`` names its ``t = 2 + k`` texts (``k`` hard negatives for infonce, 0 for
the pair losses) by text id, so ``#N`` repeats and resampled negatives cost no tokens::

    tokens.bin    int32   [T]         every text's ids, back to back
    offsets.npy   int64   [texts + 1] text j = tokens[offsets[j]:offsets[j + 1]]
    texts.npy     int64   [n, t]      example i's text ids: query, doc, k negatives
    labels.npy    float64 [n]         labelled losses only
    held_out.jsonl                    ``--split_dataset_ratio``'s eval rows, as text, in split order
    meta.json                         counts, the data report (what the trainer logs), the
                                      largest token id, each other file's size and CRC-32

A build writes into a temporary sibling ``.<key>.tmp-*`` and renames it to ``<key>`` when
complete, so a directory named ``<key>`` is always a whole store: a killed build leaves only
its temporary directory, and of two concurrent builders (nodes sharing the cache) one rename
wins and the other's identical result is dropped. Reuse reads the whole store once against
its recorded checksums (``damage``); a damaged store is moved aside and built again.

The build streams: it reads each file row by row (``iter_examples``) and tokenises
``chunk_size`` rows at a time, so neither the text nor the token lists of the whole set are
ever in memory; it holds a few integers per row (``_Rows``). The held-out rows' text is read
back in a second pass over the files. Readers never see the training text.

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
import zlib
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist

from megaemb.data.formats import DataError, Example, RowReport, iter_examples, parse_spec, sample_indices
from megaemb.data.negatives import negative_picks
from megaemb.data.tokenize import EmbeddingTokenizer, TokenizedExample, format_query

FORMAT = 5  # raise when the files or the tokenisation change: old stores then stop matching
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model")
# the other ranks wait this long for their node's build (hours for 10M long rows); a rank that
# dies ends the job through the launcher, so a long wait cannot hide a crash
BUILD_TIMEOUT = datetime.timedelta(hours=24)
ASSEMBLY_ROWS = 1 << 20  # examples whose text ids are assembled at once


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

def split_positions(n: int, ratio: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (train positions in order, held-out positions in split order) of ``n`` examples:
    the first ``max(1, int(n * ratio))`` of ``torch.randperm(n)`` seeded by ``seed`` are
    held out."""
    if ratio <= 0:
        return np.arange(n), np.zeros(0, np.int64)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    n_val = max(1, int(n * ratio))
    return np.sort(order[n_val:]), order[:n_val]


@dataclass
class _Rows:
    """Pass 1's record of every valid row of every dataset spec, in order (``r`` = row id)."""

    first: np.ndarray        # int64 [R + 1]: text id of row r's query; doc +1, negatives +2 ..
    negatives: np.ndarray    # int64 [R]: negatives row r has (the tokenised ones are <= k)
    labels: np.ndarray       # float64 [R] (labelled losses; else empty)
    cut: np.ndarray          # bool [texts]: text j was cut to max_length
    spec_rows: list[int]     # valid rows per spec
    report: RowReport
    max_id: int              # the largest token id (-1 when there are no tokens)

    @property
    def starts(self) -> list[int]:
        """[specs + 1]: spec s holds rows ``starts[s]:starts[s + 1]``."""
        return list(itertools.accumulate(self.spec_rows, initial=0))

    def examples(self, spec: StoreSpec) -> np.ndarray:
        """int64 [n]: the row id of each example, after each spec's ``#N`` sampling."""
        parts = [start + (np.arange(rows) if count is None else np.asarray(sample_indices(rows, count, spec.seed)))
                 for start, rows, (_, count) in zip(self.starts, self.spec_rows, map(parse_spec, spec.datasets))]
        return np.concatenate(parts).astype(np.int64)


def _read(spec: StoreSpec, report: RowReport) -> Iterator[tuple[int, Iterator[Example]]]:
    """``(spec index, its valid rows)`` for each dataset spec, streamed."""
    for index, text in enumerate(spec.datasets):
        yield index, iter_examples(parse_spec(text)[0], spec.loss_type, spec.bad_rows, False, report)


def _tokenize(spec: StoreSpec, out: str, chunk_size: int, log: Callable[[str], None]) -> _Rows:
    """Pass 1: ``tokens.bin`` and ``offsets.npy`` of every valid row, ``chunk_size`` rows at a
    time. Only the first ``k`` negatives of a row are tokenised when ``k`` is known."""
    tok = EmbeddingTokenizer(spec.tokenizer_dir, spec.max_length)
    infonce = spec.loss_type == "infonce"
    cap = spec.hard_negatives if infonce else 0
    report, spec_rows = RowReport(), []
    lengths, cut, negatives, per_row, labels = [np.zeros(1, np.int64)], [], [], [], []
    done, every, max_id = 0, max(chunk_size, 100_000), -1
    with open(os.path.join(out, "tokens.bin"), "wb") as f:
        for _, rows in _read(spec, report):
            spec_rows.append(0)
            while chunk := list(itertools.islice(rows, chunk_size)):
                kept = [e.negatives[:cap] for e in chunk] if infonce else [[] for _ in chunk]
                texts = [t for e, negs in zip(chunk, kept)
                         for t in (format_query(e.query, spec.query_instruction or None), e.response, *negs)]
                ids, chunk_cut = tok.encode_marked(texts)
                lengths.append(np.fromiter(map(len, ids), np.int64, len(ids)))
                flat = np.fromiter(itertools.chain.from_iterable(ids), np.int32, int(lengths[-1].sum()))
                f.write(flat.tobytes())
                max_id = max(max_id, int(flat.max(initial=-1)))
                cut.append(np.array(chunk_cut, bool))
                negatives.append(np.array([len(e.negatives) for e in chunk], np.int64))
                per_row.append(np.array([2 + len(negs) for negs in kept], np.int64))
                labels.append(np.array([e.label for e in chunk if not infonce], np.float64))
                spec_rows[-1] += len(chunk)
                if (done + len(chunk)) // every > done // every:
                    log(f"  tokenized {done + len(chunk)} rows")
                done += len(chunk)
    np.save(os.path.join(out, "offsets.npy"), np.cumsum(np.concatenate(lengths)))
    first = np.concatenate([np.zeros(1, np.int64), np.cumsum(np.concatenate(per_row))])
    return _Rows(first, np.concatenate(negatives), np.concatenate(labels), np.concatenate(cut),
                 spec_rows, report, max_id)


def _rows_at(spec: StoreSpec, rows: _Rows, wanted: np.ndarray) -> dict[int, Example]:
    """The text of the rows ``wanted`` (row ids), read again from their files."""
    wanted, found, starts = set(wanted.tolist()), {}, rows.starts
    for index, examples in _read(spec, RowReport()):
        start, end = starts[index], starts[index + 1]
        need = {r for r in wanted if start <= r < end}
        for r, example in zip(range(start, end), examples) if need else ():
            if r in need:
                found[r] = example
                need.discard(r)
                if not need:
                    break
    return found


def _write_store(spec: StoreSpec, out: str, chunk_size: int, log: Callable[[str], None]) -> None:
    rows = _tokenize(spec, out, chunk_size, log)
    examples = rows.examples(spec)
    train_pos, held_pos = split_positions(len(examples), spec.split_dataset_ratio, spec.seed)
    if not len(train_pos):
        raise DataError(f"{', '.join(spec.datasets)}: {len(examples)} row(s), all held out by "
                        f"--split_dataset_ratio {spec.split_dataset_ratio}; none is left to train on")
    train, held = examples[train_pos], examples[held_pos]  # row ids
    text = _rows_at(spec, rows, held)
    with open(os.path.join(out, "held_out.jsonl"), "w") as f:
        f.writelines(json.dumps(asdict(text[int(r)])) + "\n" for r in held)
    report = rows.report
    meta = {"format": FORMAT, "examples": len(train), "k": 0, "held_out": len(held), "max_id": rows.max_id,
            "report": {"rows_read": report.rows_read, "skipped": dict(report.skipped),
                       "messages": report.messages}}
    k, picks = 0, np.zeros((len(train), 0), np.int64)
    if spec.loss_type == "infonce":
        counts = rows.negatives[train]
        k = int(counts.max()) if spec.hard_negatives is None else spec.hard_negatives
        picks, topped = negative_picks(counts, k, spec.seed,
                                       lambda i: _rows_at(spec, rows, train[i:i + 1])[int(train[i])].source)
        meta.update(k=k, negatives_per_row=[int(counts.min()), int(counts.max())], topped_up=topped)
    else:
        np.save(os.path.join(out, "labels.npy"), rows.labels[train])
    ids = np.lib.format.open_memmap(os.path.join(out, "texts.npy"), "w+", np.int64, (len(train), 2 + k))
    truncated = 0
    for a in range(0, len(train), ASSEMBLY_ROWS):  # [rows, t] at a time: no [n, t] temporaries
        first, p = rows.first[train[a:a + ASSEMBLY_ROWS]], picks[a:a + ASSEMBLY_ROWS]
        other = rows.first[train[np.where(p < 0, -1 - p, 0)]] + 1  # another example's doc
        block = np.concatenate(
            [first[:, None], first[:, None] + 1, np.where(p >= 0, first[:, None] + 2 + p, other)], axis=1)
        ids[a:a + len(block)] = block
        truncated += int(rows.cut[block].sum())
    ids.flush()
    del ids
    meta.update(tokens=os.path.getsize(os.path.join(out, "tokens.bin")) // 4, truncated=truncated,
                files={name: _checksum(os.path.join(out, name)) for name in sorted(os.listdir(out))})
    meta["meta_crc"] = _meta_crc(meta)  # meta.json's own checksum: an edited count is damage too
    with open(os.path.join(out, "meta.json"), "w") as f:  # last: its presence marks a whole store
        json.dump(meta, f)


def _meta_crc(meta: dict) -> int:
    """CRC-32 of ``meta`` without its ``meta_crc`` entry (keys sorted)."""
    body = {k: v for k, v in meta.items() if k != "meta_crc"}
    return zlib.crc32(json.dumps(body, sort_keys=True).encode())


# ------------------------------------------------------------------------------ verify

def _checksum(path: str) -> list[int]:
    """``[size, CRC-32]`` of a file, read in 64 MiB blocks (CRC-32 runs at about 4 GB/s)."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while block := f.read(1 << 26):
            crc, size = zlib.crc32(block, crc), size + len(block)
    return [size, crc]


def damage(path: str) -> str | None:
    """Why the store at ``path`` cannot be used, or None when every file its ``meta.json``
    lists is there with the size and CRC-32 its build recorded. One read of the store: a
    second of a multi-hour tokenisation, and it catches what opening cannot (flipped or random
    bytes in ``tokens.bin`` would be token ids past the vocabulary, or silently other text)."""
    try:
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
        files = meta["files"]
        if not isinstance(files, dict):
            raise TypeError("files is not a mapping")
    except FileNotFoundError:
        return "meta.json is missing"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"meta.json is unreadable ({type(e).__name__}: {e})"
    if meta.get("meta_crc") != _meta_crc(meta):
        return "meta.json does not match its own checksum (edited or damaged)"
    for name, expected in sorted(files.items()):
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            return f"{name} is missing"
        size, crc = _checksum(full)
        if [size, crc] != expected:
            if size != expected[0]:
                return f"{name} does not match its build's size ({size} bytes, expected {expected[0]})"
            return f"{name} does not match its build's CRC-32 (same size, {size} bytes; other contents)"
    return None


def _unwritable(cache: str, error: OSError) -> PermissionError:
    return PermissionError(f"{cache}: cannot write a token store there ({error.strerror or error}); "
                           "give a writable --data_cache_dir (or set MEGAEMB_CACHE)")


def _discard(path: str) -> None:
    """Move the damaged store ``path`` out of its name, then delete it (a concurrent builder
    never sees half a store under the name)."""
    cache = os.path.dirname(path)
    doomed = os.path.join(cache, f".{os.path.basename(path)}.damaged-{os.getpid()}")
    try:
        os.rename(path, doomed)
    except FileNotFoundError:  # another builder moved it already
        return
    except OSError as e:
        raise _unwritable(cache, e) from None
    shutil.rmtree(doomed, ignore_errors=True)


def build_token_store(spec: StoreSpec, cache: str, log: Callable[[str], None] = print,
                      chunk_size: int = 2048, fresh_process: bool = False) -> str:
    """The path of ``spec``'s store under ``cache``, built now unless it exists. With
    ``fresh_process`` the build runs in a spawned process (``log`` must pickle), so the
    tokenizer's memory and the per-row arrays go back to the system when it ends instead of
    staying in this process's heap (a training rank's); its errors are raised here."""
    path = os.path.join(cache, store_key(spec))
    if os.path.isdir(path):
        problem = damage(path)
        if problem is None:
            log(f"reusing token store {path}")
            return path
        log(f"note: token store {path} is damaged ({problem}); rebuilding it")
        _discard(path)
    if fresh_process:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(build_token_store, spec, cache, log, chunk_size).result()
    prefix = f".{os.path.basename(path)}.tmp-"
    try:
        os.makedirs(cache, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=prefix, dir=cache)
    except OSError as e:
        raise _unwritable(cache, e) from None
    unfinished = [n for n in os.listdir(cache) if n.startswith(prefix) and n != os.path.basename(tmp)]
    if unfinished:
        log(f"note: {len(unfinished)} unfinished build(s) of this store in {cache} ({prefix}*): "
            "left by killed runs, or building now; delete them when no run is building")
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
        """Open the store at ``path`` (checked whole by ``damage`` when it was built or
        reused); ``ValueError`` naming it when its files cannot be read or disagree."""
        self.path = path
        try:
            with open(os.path.join(path, "meta.json")) as f:
                self.meta = json.load(f)
            self.offsets = np.load(os.path.join(path, "offsets.npy"), mmap_mode="r")
            self.texts = np.load(os.path.join(path, "texts.npy"), mmap_mode="r")
            n_tokens = os.path.getsize(os.path.join(path, "tokens.bin")) // 4
            whole = self.meta.get("format") == FORMAT and n_tokens == self.offsets[-1] \
                and self.texts.shape == (len(self), 2 + self.meta["k"])
        except (OSError, ValueError, KeyError, IndexError) as e:
            raise ValueError(f"{path}: damaged token store ({type(e).__name__}: {e}); delete it, "
                             "the next run rebuilds it") from None
        if not whole:
            raise ValueError(f"{path}: damaged token store (format or sizes do not match); delete it, "
                             "the next run rebuilds it")
        # np.memmap cannot map an empty file
        self.tokens = (np.memmap(os.path.join(path, "tokens.bin"), np.int32, mode="r") if n_tokens
                       else np.zeros(0, np.int32))
        labels = os.path.join(path, "labels.npy")
        self.labels = np.load(labels, mmap_mode="r") if os.path.isfile(labels) else None

    def __len__(self) -> int:
        return self.meta["examples"]

    def check_vocab(self, vocab_size: int, model: str) -> None:
        """Every token id fits a model with ``vocab_size`` embeddings: ``ValueError`` naming
        the store and the model otherwise (a tokenizer that is not the model's would end in
        an ``IndexError`` inside the embedding)."""
        if self.meta["max_id"] >= vocab_size:
            raise ValueError(f"{self.path}: token id {self.meta['max_id']} is past --model {model}'s "
                             f"vocabulary ({vocab_size} ids): its tokenizer files do not belong to its weights")

    def __getitem__(self, i: int) -> TokenizedExample:
        if not 0 <= i < len(self):
            raise IndexError(f"example {i} of {len(self)}")
        texts = [self.tokens[self.offsets[j]:self.offsets[j + 1]] for j in self.texts[i].tolist()]
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
    log = functools.partial(print, flush=True) if verbose else _silent
    if dist.get_world_size() > 1:
        log(f"token store: local rank 0 of each node builds or reuses it in {cache}; the other "
            f"ranks wait up to {BUILD_TIMEOUT.total_seconds() / 3600:g} h for it")
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        try:
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
