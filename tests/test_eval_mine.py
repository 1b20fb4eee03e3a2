"""``megaemb eval`` and ``megaemb mine``: metrics against a plain numpy computation, tiled
exact search, mining rules, and the commands end to end (BEIR folder, infonce rows, STS pairs,
Matryoshka rows and PNG, the embedding cache, bad input)."""
import json
import os

import numpy as np
import pytest

from distributed import run_distributed
from test_train import DATA, _megaemb

DEV = os.path.join(os.path.dirname(DATA), "dev.jsonl")


def _numpy_metrics(q, c, relevant):
    """Independent reference: full score matrix, argsort, loops."""
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    c = c / np.linalg.norm(c, axis=1, keepdims=True)
    order = np.argsort(-(q @ c.T), axis=1, kind="stable")
    out = {f"recall@{k}": [] for k in (1, 5, 10, 100)} | {"ndcg@10": [], "mrr@10": [], "map@100": []}
    for row, rel in zip(order, relevant):
        for k in (1, 5, 10, 100):
            out[f"recall@{k}"].append(len(set(row[:k]) & rel) / len(rel))
        dcg = sum(1 / np.log2(r + 2) for r, d in enumerate(row[:10]) if d in rel)
        idcg = sum(1 / np.log2(r + 2) for r in range(min(len(rel), 10)))
        out["ndcg@10"].append(dcg / idcg)
        first = next((r for r, d in enumerate(row[:10]) if d in rel), None)
        out["mrr@10"].append(0 if first is None else 1 / (first + 1))
        hits, ap = 0, 0.0
        for r, d in enumerate(row[:100]):
            if d in rel:
                hits += 1
                ap += hits / (r + 1)
        out["map@100"].append(ap / len(rel))
    return {k: float(np.mean(v)) for k, v in out.items()}


def test_retrieval_metrics_equal_numpy_and_tiling_changes_nothing(monkeypatch):
    import megaemb.evaluate as ev

    rng = np.random.default_rng(0)
    q, c = rng.normal(size=(37, 16)), rng.normal(size=(300, 16))
    relevant = [set(rng.choice(300, size=rng.integers(1, 4), replace=False).tolist()) for _ in range(37)]
    ref = _numpy_metrics(q, c, relevant)
    got = ev.retrieval_metrics(q, c, relevant, ks=(1, 5, 10, 100), mrr_k=10, map_k=100)
    monkeypatch.setattr(ev, "CORPUS_BLOCK", 7)  # many corpus blocks, tiny tiles
    tiled = ev.retrieval_metrics(q, c, relevant, ks=(1, 5, 10, 100), mrr_k=10, map_k=100, max_scores=50)
    for key, value in ref.items():
        assert abs(got[key] - value) < 1e-9 and abs(tiled[key] - value) < 1e-9, (key, got[key], tiled[key], value)
    assert ref["recall@100"] > ref["recall@10"] > ref["recall@1"] >= 0  # the fixture discriminates
    ids, scores = ev.search(q, c, 20, max_scores=50)
    full = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (c / np.linalg.norm(c, axis=1, keepdims=True)).T
    assert (ids == np.argsort(-full, axis=1)[:, :20]).all()
    assert np.allclose(scores, np.take_along_axis(full, ids, 1), atol=1e-5)


def test_mining_skips_positives_and_respects_margin_and_range():
    from megaemb.mine import mine_negatives, parse_range

    rng = np.random.default_rng(1)
    c = rng.normal(size=(200, 8))
    c[1] = c[0] + 1e-3 * rng.normal(size=8)  # a near-duplicate of document 0: a false negative
    q = c[[0, 5, 9]] + 0.3 * rng.normal(size=(3, 8))
    positive = [0, 5, 9]
    positives = [{0, 7}, {5}, {9}]  # query 0 has two labelled responses
    for lo, hi, margin in ((0, 50, 0.95), (3, 40, 0.8), (0, 200, 10.0)):
        out = mine_negatives(q, c, positive, positives, num_negatives=7, lo=lo, hi=hi, margin=margin)
        qn = q / np.linalg.norm(q, axis=1, keepdims=True)
        cn = c / np.linalg.norm(c, axis=1, keepdims=True)
        scores = qn @ cn.T
        for i, negs in enumerate(out):
            assert len(negs) <= 7 and not set(negs) & positives[i], (i, negs)
            rank = {d: r for r, d in enumerate(np.argsort(-scores[i]))}
            assert all(lo <= rank[d] < hi for d in negs)
            assert all(scores[i, d] <= margin * scores[i, positive[i]] + 1e-6 for d in negs)
            assert negs == sorted(negs, key=lambda d: rank[d])  # hardest first
    wide = mine_negatives(q, c, positive, positives, num_negatives=7, lo=0, hi=200, margin=10.0)
    assert all(len(n) == 7 for n in wide)
    strict = mine_negatives(q, c, positive, positives, num_negatives=7, lo=0, hi=200, margin=0.95)
    assert 1 not in strict[0] and 1 in wide[0]  # the near-duplicate is dropped by the margin
    assert parse_range("10-100") == (10, 100)
    for bad in ("100-10", "x", "5"):
        with pytest.raises(ValueError, match="--range"):
            parse_range(bad)


@pytest.mark.timeout(60)
def test_sts_nan_has_a_reason(tmp_path):
    """Constant STS labels are refused with the reason (no silent ``nan nan``); a NaN that
    remains (every cosine equal) is explained under the table."""
    from megaemb.benchmark import read_eval_set, table
    from megaemb.data.formats import DataError
    from megaemb.evaluate import pair_metrics

    pairs = tmp_path / "sts.jsonl"
    pairs.write_text("".join(json.dumps({"query": f"q{i}", "response": f"d{i}", "label": 1.0}) + "\n"
                             for i in range(4)))
    with pytest.raises(DataError, match="every label is 1; Spearman and Pearson"):
        read_eval_set([str(pairs)])
    same = np.ones((4, 8))
    printed = table("pairs", {None: pair_metrics(same, same, [0.0, 1.0, 2.0, 3.0])}, 8)
    assert "nan" in printed and "the model gives every pair the same cosine" in printed, printed
    varied = np.random.default_rng(0).normal(size=(4, 8))
    assert "nan" not in table("pairs", {None: pair_metrics(varied, same, [0.0, 1.0, 2.0, 3.0])}, 8)


def _beir(root):
    os.makedirs(root / "qrels")
    docs = ["apt: command-line package manager", "jq: lightweight JSON processor",
            "gcc: the GNU C compiler", "vim: a text editor", "curl: transfer data with URLs"]
    (root / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "title": "", "text": d}) + "\n"
                                               for i, d in enumerate(docs)))
    qs = ["install packages", "parse json on the shell", "compile C code"]
    (root / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": t}) + "\n"
                                                for i, t in enumerate(qs)))
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td0\t1\nq1\td1\t1\nq2\td2\t1\n"
                                             "q2\td3\t0\n")
    return str(root)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name, lines, message", [
    ("corpus.jsonl", ['{"_id": "d0", "text": "a"}', '{"_id": "d1", "text": "b"}', '{"_id": "d0", "text": "c"}'],
     "corpus.jsonl:3: duplicate _id 'd0' (also on line 1)"),
    ("queries.jsonl", ['{"_id": "q0", "text": "a"}', '{"_id": "q0", "text": "b"}'],
     "queries.jsonl:2: duplicate _id 'q0' (also on line 1)"),
    ("qrels/test.tsv", ["query-id\tcorpus-id\tscore", "q0\td0\t1", "q1\td1\t1", "q0\td0\t0"],
     "qrels/test.tsv:4: query-id 'q0', corpus-id 'd0' has score 0 here and 1 on line 2"),
])
def test_beir_duplicates_name_both_lines(tmp_path, name, lines, message):
    from megaemb.data.eval_sets import read_beir
    from megaemb.data.formats import DataError

    beir = _beir(tmp_path / "beir")
    (tmp_path / "beir" / name).write_text("".join(line + "\n" for line in lines))
    with pytest.raises(DataError) as e:
        read_beir(beir)
    assert str(e.value) == os.path.join(beir, message)


@pytest.mark.timeout(60)
def test_beir_repeated_identical_qrels_line_is_one_pair(tmp_path):
    from megaemb.data.eval_sets import read_beir

    beir = _beir(tmp_path / "beir")
    with open(os.path.join(beir, "qrels", "test.tsv"), "a") as f:
        f.write("q0\td0\t1.0\n")
    assert read_beir(beir).relevant == [{0}, {1}, {2}]


@pytest.mark.timeout(60)
def test_eval_files_keep_one_format_per_row(tmp_path):
    """eval decides pairs vs infonce from the first row; every later row must match it, in
    files and in datasets folders alike."""
    import datasets

    from megaemb.benchmark import read_eval_set
    from megaemb.data.eval_sets import PairSet, RetrievalSet
    from megaemb.data.formats import DataError

    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"query": "q", "response": "relevant"}\n'
                     '{"query": "q", "response": "not relevant", "label": 0.0}\n')
    with pytest.raises(DataError, match=f"^{mixed}:2: field 'label': 0.0 in an infonce row"):
        read_eval_set([str(mixed)])
    flipped = tmp_path / "flipped.jsonl"
    flipped.write_text('{"query": "q", "response": "a", "label": 0.5}\n{"query": "q", "response": "b"}\n')
    with pytest.raises(DataError, match=f"^{flipped}:2: field 'label': missing"):
        read_eval_set([str(flipped)])
    folder = str(tmp_path / "pairs")
    datasets.Dataset.from_list([{"query": f"q{i}", "response": f"r{i}", "label": i / 2}
                                for i in range(3)]).save_to_disk(folder)
    pairs = read_eval_set([folder])
    assert isinstance(pairs, PairSet) and pairs.labels == [0.0, 0.5, 1.0]
    infonce = tmp_path / "infonce.jsonl"
    infonce.write_text('{"query": "q", "response": "a", "label": null}\n')
    assert isinstance(read_eval_set([str(infonce)]), RetrievalSet)


@pytest.mark.timeout(600)
def test_eval_and_mine_commands(tiny_models, tmp_path):
    model = tiny_models["dense"]
    beir = _beir(tmp_path / "beir")
    cache = str(tmp_path / "cache")
    out = tmp_path / "m.json"
    first = _megaemb("eval", "--model", model, "--dataset", beir, "--output", str(out), "--mrl_dims", "16", "64",
                     "--cache_dir", cache)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "3 queries, 5 documents" in first.stdout and "(cached" not in first.stdout, first.stdout
    metrics = json.loads(out.read_text())
    keys = {"recall@1", "recall@5", "recall@10", "recall@100", "ndcg@10", "mrr@10", "map@100"}
    assert keys <= set(metrics) and {k + "@dim16" for k in keys} <= set(metrics), metrics
    assert metrics["dim"] == 64 and metrics["recall@5"] == 1.0  # 5 documents
    assert (tmp_path / "m_dims.png").stat().st_size > 1000
    # the same metrics from megaemb embed + the numpy reference (the command adds nothing wrong)
    texts = tmp_path / "t.jsonl"
    corpus = [json.loads(l)["text"] for l in open(os.path.join(beir, "corpus.jsonl"))]
    queries = [json.loads(l)["text"] for l in open(os.path.join(beir, "queries.jsonl"))]
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in queries + corpus))
    r = _megaemb("embed", "--model", model, "--input", str(texts), "--output", str(tmp_path / "e.npy"))
    assert r.returncode == 0, r.stderr[-3000:]
    e = np.load(tmp_path / "e.npy")
    ref = _numpy_metrics(e[:3], e[3:], [{0}, {1}, {2}])
    assert all(abs(metrics[k] - v) < 1e-5 for k, v in ref.items()), (metrics, ref)
    # a second run reuses the corpus embeddings; an existing --output needs --overwrite
    again = _megaemb("eval", "--model", model, "--dataset", beir, "--cache_dir", cache, "--mrl_dims", "16", "64")
    assert again.returncode == 0 and "(cached embeddings)" in again.stdout, again.stdout + again.stderr[-2000:]
    table = [l for l in first.stdout.splitlines() if l[:3] in ("16 ", "64 ")]
    assert len(table) == 2 and table == [l for l in again.stdout.splitlines() if l[:3] in ("16 ", "64 ")]
    refused = _megaemb("eval", "--model", model, "--dataset", beir, "--output", str(out))
    assert refused.returncode == 2 and "--overwrite" in refused.stderr, refused.stderr[-2000:]
    # infonce rows and STS pairs
    r = _megaemb("eval", "--model", model, "--dataset", f"{DEV}#40", "--cache_dir", cache,
                 "--output", str(tmp_path / "dev.json"))
    assert r.returncode == 0, r.stderr[-3000:]
    dev = json.loads((tmp_path / "dev.json").read_text())
    assert dev["kind"] == "retrieval" and 0 <= dev["recall@10"] <= 1
    pairs = tmp_path / "sts.jsonl"  # STS-B's 0-5 scale: only order and trend are scored
    pairs.write_text("".join(json.dumps({"query": f"package {i}", "response": f"description {i % 3}",
                                         "label": i / 2}) + "\n" for i in range(10)))
    r = _megaemb("eval", "--model", model, "--dataset", str(pairs), "--output", str(tmp_path / "sts.json"))
    assert r.returncode == 0, r.stderr[-3000:]
    sts = json.loads((tmp_path / "sts.json").read_text())
    assert sts["kind"] == "pairs" and -1 <= sts["spearman"] <= 1 and "pearson" in sts
    # bad flags: one line before any load
    for extra, fragment in ((["--mrl_dims", "0"], "--mrl_dims must be positive"),
                            (["--mrl_dims", "16", "-8"], "--mrl_dims must be positive"),
                            (["--dataset", beir + "#2"], "evaluated alone and whole")):
        bad = _megaemb("eval", "--model", model, "--dataset", beir, *extra)
        assert bad.returncode == 2 and fragment in bad.stderr, bad.stderr[-2000:]
    nested = tmp_path / "new" / "dir" / "m.json"  # created, like embed's --output
    r = _megaemb("eval", "--model", model, "--dataset", beir, "--output", str(nested), "--cache_dir", cache)
    assert r.returncode == 0 and nested.is_file(), r.stderr[-2000:]
    # a broken BEIR file: one line naming file and line
    (tmp_path / "beir" / "queries.jsonl").write_text('{"_id": "q0", "text": "x"}\n{"_id": "q1"}\n')
    bad = _megaemb("eval", "--model", model, "--dataset", beir)
    lines = [l for l in bad.stderr.splitlines() if l.startswith("megaemb eval: error:")]
    assert bad.returncode == 2 and len(lines) == 1 and "queries.jsonl:2" in lines[0], bad.stderr[-2000:]
    # mine: infonce output, never a query's own positive
    mined = tmp_path / "mined.jsonl"
    r = _megaemb("mine", "--model", model, "--dataset", f"{DATA}#60", "--output", str(mined),
                 "--num_negatives", "3", "--range", "0-40", "--margin", "10", "--cache_dir", cache)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(l) for l in mined.read_text().splitlines()]
    # (a random model scores some positives below 0, where margin x score excludes everything)
    full = sum(len(x["rejected_response"]) == 3 for x in rows)
    assert len(rows) == 60 and all(len(x["rejected_response"]) <= 3 for x in rows) and full >= 30, full
    responses = {}
    for x in rows:
        responses.setdefault(x["query"], set()).add(x["response"])
    assert all(not set(x["rejected_response"]) & responses[x["query"]] for x in rows)
    # the mined file trains (its format is the infonce format)
    r = _megaemb("sft", "--model", model, "--dataset", str(mined), "--max_length", "32", "--micro_batch_size", "2",
                 "--global_batch_size", "4", "--train_iters", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    again = _megaemb("mine", "--model", model, "--dataset", str(mined), "--output", str(mined))
    assert again.returncode == 2 and "destroy the input" in again.stderr, again.stderr[-2000:]
    for dataset in (str(pairs), beir):
        refused = _megaemb("mine", "--model", model, "--dataset", dataset, "--output", str(tmp_path / "x.jsonl"))
        assert refused.returncode == 2 and "mine reads infonce rows" in refused.stderr, refused.stderr[-2000:]


# ------------------------------------------------------------------------------ embedding cache

def _spoil(path: str, how: str) -> None:
    data = bytearray(open(path, "rb").read())
    if how == "flipped":  # one byte of the array's data (the zip's member ends before its directory)
        data[len(data) // 3] ^= 0x40
    elif how == "truncated":
        data = data[:len(data) // 2]
    else:  # emptied
        data = bytearray()
    open(path, "wb").write(bytes(data))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("how", ["flipped", "truncated", "emptied"])
def test_damaged_embedding_cache_entry_is_encoded_again(tmp_path, monkeypatch, capsys, how):
    """A cache entry is checked (CRC-32) when read: a damaged one is noted in one line naming
    it and encoded again, never used as it is (a flipped byte used to change recall@10
    silently; a truncated file ended in ``EOF: reading array header`` naming no file)."""
    from megaemb import benchmark

    monkeypatch.setattr(benchmark.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(benchmark.dist, "broadcast_object_list", lambda objects, src: None)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    texts = [f"document {i}" for i in range(64)]
    want = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    calls = []

    def encode(batch, instruction):
        calls.append(len(batch))
        return want.copy()

    cache = benchmark.EmbeddingCache(str(tmp_path / "cache"), str(model), 128)
    assert cache.embed(encode, texts)[1] is False and cache.embed(encode, texts)[1] is True and calls == [64]
    entry = os.path.join(tmp_path / "cache", os.listdir(tmp_path / "cache")[0])
    capsys.readouterr()
    _spoil(entry, how)
    got, hit = cache.embed(encode, texts)
    notes = capsys.readouterr().out.splitlines()
    assert not hit and calls == [64, 64] and np.array_equal(got, want)
    assert len(notes) == 1 and notes[0].startswith(f"note: embedding cache entry {entry} is damaged"), notes
    got, hit = cache.embed(encode, texts)  # rewritten whole
    assert hit and np.array_equal(got, want) and calls == [64, 64]


@pytest.mark.timeout(30)
def test_unwritable_embedding_cache_is_a_note(tmp_path, monkeypatch, capsys):
    """A --cache_dir that cannot be written costs the reuse, not the run."""
    from megaemb import benchmark

    monkeypatch.setattr(benchmark.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(benchmark.dist, "broadcast_object_list", lambda objects, src: None)
    blocker = tmp_path / "file"
    blocker.write_text("")
    cache = benchmark.EmbeddingCache(str(blocker / "cache"), str(tmp_path), 128)
    got, hit = cache.embed(lambda texts, instruction: np.ones((2, 4), np.float32), ["a", "b"])
    notes = capsys.readouterr().out.splitlines()
    assert not hit and got.shape == (2, 4)
    assert len(notes) == 1 and notes[0].startswith(f"note: cannot write the embedding cache {blocker}/cache/"), notes


def _beir_val_run(rank, world, model, beir):
    from megaemb.config import SFTConfig
    from megaemb.train import Trainer

    cfg = SFTConfig(model=model, dataset=[f"{DATA}#8"], val_dataset=[beir], max_length=32, micro_batch_size=2,
                    global_batch_size=4, train_iters=1, lr=1e-4)
    return Trainer(cfg).run()["eval_before"]


@pytest.mark.timeout(300)
def test_sft_val_dataset_takes_a_beir_folder(tiny_models, tmp_path):
    """``sft --val_dataset`` takes the BEIR folder ``eval`` takes and scores it as ``eval``
    does (before training: the same model, the same numbers); alone and whole, as in eval."""
    from megaemb.preflight import check_eval_datasets

    model, beir = tiny_models["dense"], _beir(tmp_path / "beir")
    before = run_distributed(_beir_val_run, 1, model, beir, timeout=240)[0]
    r = _megaemb("eval", "--model", model, "--dataset", beir, "--output", str(tmp_path / "m.json"))
    assert r.returncode == 0, r.stderr[-3000:]
    ref = json.loads((tmp_path / "m.json").read_text())
    for key in ("recall@1", "recall@10", "ndcg@10", "mrr@10"):
        assert abs(before[key] - ref[key]) < 1e-6, (key, before, ref)
    for specs in ([f"{beir}#2"], [beir, DATA]):
        with pytest.raises(ValueError, match="--val_dataset .*a BEIR folder is evaluated alone and whole"):
            check_eval_datasets(specs, "--val_dataset")


@pytest.mark.timeout(120)
def test_mine_never_overwrites_any_of_its_datasets(tiny_models, tmp_path):
    """Every --dataset is protected from --output (not only the last one), and a file whose
    name holds a '#' is protected under its own name."""
    from megaemb.cli import build_parser, check_args

    rows = "".join(json.dumps({"query": f"q{i}", "response": f"r{i}"}) + "\n" for i in range(4))
    first, second, odd = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c#d.jsonl"
    for path in (first, second, odd):
        path.write_text(rows)
    for datasets, output in (([first, second], first), ([first, second], second), ([odd], odd),
                             ([f"{odd}#2"], odd)):
        args = build_parser().parse_args(["mine", "--model", tiny_models["dense"], "--dataset",
                                          *map(str, datasets), "--output", str(output), "--overwrite", "true"])
        with pytest.raises(FileExistsError, match="would destroy the input"):
            check_args(args)
    assert first.read_text() == second.read_text() == odd.read_text() == rows
