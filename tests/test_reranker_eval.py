"""``megaemb eval --model RERANKER --retriever EMBEDDER``: the metrics of a reranked top-k
against a hand computation (a reverse-order scorer, a positive outside the top-k), the
command end to end against transformers (the embedder's last-token cosine top-k, the model
card's yes/no scores), and bad flag combinations as one line."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from test_eval_mine import _beir
from test_train import ROOT, _megaemb


@pytest.mark.timeout(30)
def test_rerank_metrics_by_hand():
    """Three queries, top-3 each; the scorer reverses the retriever's order."""
    from megaemb.benchmark import rerank_results

    ranked = np.array([[4, 2, 7],   # positive 4 first -> reversed: third
                       [1, 3, 5],   # positive 9 outside the top 3: a miss either way
                       [1, 3, 5]])  # positives 3 and 8: 3 second in both orders, 8 missed
    relevant = [{4}, {9}, {3, 8}]
    reverse = np.tile([1.0, 2.0, 3.0], (3, 1))
    got = rerank_results(relevant, 10, ranked, reverse)
    l2 = np.log2
    ndcg_q2 = (1 / l2(3)) / (1 + 1 / l2(3))  # ideal: both positives at ranks 1, 2
    expected = {"retriever": {"ndcg@10": (1 + 0 + ndcg_q2) / 3, "mrr@10": (1 + 0 + 1 / 2) / 3,
                              "recall@1": 1 / 3, "recall@3": (1 + 0 + 0.5) / 3,
                              "map@3": (1 + 0 + 0.5 / 2) / 3},
                "reranked": {"ndcg@10": (1 / l2(4) + 0 + ndcg_q2) / 3,
                             "mrr@10": (1 / 3 + 0 + 1 / 2) / 3, "recall@1": 0.0,
                             "recall@3": (1 + 0 + 0.5) / 3, "map@3": (1 / 3 + 0 + 0.5 / 2) / 3}}
    for block, values in expected.items():
        for key, value in values.items():
            assert abs(got[block][key] - value) < 1e-12, (block, key, got[block][key], value)
    ties = rerank_results(relevant, 10, ranked, np.zeros((3, 3)))  # ties keep the first order
    assert ties["reranked"] == ties["retriever"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from megaemb.tiny import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("rerank_eval")
    return {"embedder": make_tiny_checkpoint(str(root / "embedder"), seed=2),
            "reranker": make_tiny_checkpoint(str(root / "reranker"), seed=8, causal_lm=True),
            "beir": _beir(root / "beir"), "root": root}


def _hf_top_k(embedder: str, queries: list[str], corpus: list[str], k: int) -> np.ndarray:
    """transformers: last-token (appended <|endoftext|>) embeddings, cosine, top ``k``."""
    from transformers import AutoModel, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(embedder), AutoModel.from_pretrained(embedder).eval()

    def embed(text):
        ids = torch.tensor([tok(text)["input_ids"] + [151643]])
        with torch.no_grad():
            return torch.nn.functional.normalize(model(input_ids=ids).last_hidden_state[0, -1], dim=0)

    q, c = torch.stack([embed(t) for t in queries]), torch.stack([embed(t) for t in corpus])
    return torch.argsort(q @ c.T, dim=1, descending=True, stable=True)[:, :k].numpy()


def _official_scores(reranker: str, pairs: list[tuple[str, str]], instruction: str) -> np.ndarray:
    """The Qwen3-Reranker model card's prompt, scored l_yes - l_no at the last position."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(reranker)
    model = AutoModelForCausalLM.from_pretrained(reranker, torch_dtype=torch.float32).eval()
    prefix = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the "
              "Query and the Instruct provided. Note that the answer can only be \"yes\" or "
              "\"no\".<|im_end|>\n<|im_start|>user\n")
    suffix = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    out = []
    for q, d in pairs:
        ids = tok.encode(prefix + f"<Instruct>: {instruction}\n<Query>: {q}\n<Document>: {d}" + suffix,
                         add_special_tokens=False)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        out.append((logits[tok.convert_tokens_to_ids("yes")] - logits[tok.convert_tokens_to_ids("no")]).item())
    return np.array(out)


def _hand_metrics(ranked: np.ndarray, relevant: list[set[int]]) -> dict:
    """nDCG@10, MRR@10, recall@k by loops (binary relevance, a positive outside ``ranked``
    a miss)."""
    ndcg, mrr, recall = [], [], []
    for row, rel in zip(ranked.tolist(), relevant):
        dcg = sum(1 / np.log2(r + 2) for r, d in enumerate(row[:10]) if d in rel)
        ndcg.append(dcg / sum(1 / np.log2(r + 2) for r in range(min(len(rel), 10))))
        first = next((r for r, d in enumerate(row[:10]) if d in rel), None)
        mrr.append(0 if first is None else 1 / (first + 1))
        recall.append(len(set(row) & rel) / len(rel))
    return {"ndcg@10": np.mean(ndcg), "mrr@10": np.mean(mrr), f"recall@{ranked.shape[1]}": np.mean(recall)}


@pytest.mark.timeout(600)
def test_eval_reranks_the_retrievers_top_k_as_transformers(models, tmp_path):
    beir, k, instruction = models["beir"], 3, "Find the Debian package this describes"
    out = tmp_path / "rerank.json"
    r = _megaemb("eval", "--model", models["reranker"], "--retriever", models["embedder"],
                 "--dataset", beir, "--top_k", str(k), "--instruction", instruction,
                 "--cache_dir", str(tmp_path / "cache"), "--output", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "reranking the top 3" in r.stdout and "reranked" in r.stdout, r.stdout
    got = json.loads(out.read_text())
    assert got["kind"] == "rerank" and got["top_k"] == k
    corpus = [json.loads(line)["text"] for line in open(os.path.join(beir, "corpus.jsonl"))]
    queries = [json.loads(line)["text"] for line in open(os.path.join(beir, "queries.jsonl"))]
    relevant = [{0}, {1}, {2}]
    top = _hf_top_k(models["embedder"], queries, corpus, k)
    scores = _official_scores(models["reranker"], [(queries[i], corpus[j]) for i, row in enumerate(top)
                                                   for j in row], instruction).reshape(top.shape)
    reranked = np.take_along_axis(top, np.argsort(-scores, axis=1, kind="stable"), 1)
    # the fixture discriminates: the reranker reorders, and some positive is outside the top k
    assert (reranked != top).any() and any(not set(row) & rel for row, rel in zip(top.tolist(), relevant))
    for block, ranking in (("retriever", top), ("reranked", reranked)):
        for key, value in _hand_metrics(ranking, relevant).items():
            assert abs(got[block][key] - value) < 1e-6, (block, key, got[block][key], value)
    assert got["retriever"]["ndcg@10"] != got["reranked"]["ndcg@10"]
    # an existing --output needs --overwrite, as eval's; the retriever's corpus embeddings are cached
    refused = _megaemb("eval", "--model", models["reranker"], "--retriever", models["embedder"],
                       "--dataset", beir, "--output", str(out))
    assert refused.returncode == 2 and "--overwrite" in refused.stderr.splitlines()[-1], refused.stderr
    again = _megaemb("eval", "--model", models["reranker"], "--retriever", models["embedder"],
                     "--dataset", beir, "--top_k", str(k), "--instruction", instruction,
                     "--cache_dir", str(tmp_path / "cache"), "--output", str(out), "--overwrite", "true")
    assert again.returncode == 0 and "(cached embeddings)" in again.stdout, again.stderr[-2000:]
    assert json.loads(out.read_text()) == got


@pytest.mark.timeout(120)
def test_bad_rerank_eval_flags_are_one_line(models, tmp_path):
    from megaemb.cli import build_parser, check_args

    beir, rr, emb = models["beir"], models["reranker"], models["embedder"]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"query": "a", "response": "b", "label": 0.5}\n'
                     '{"query": "c", "response": "d", "label": 1.0}\n')
    cases = [
        (["--model", emb, "--retriever", emb], f"--model {emb}: an embedder (--task_type embedding); "
                                                "with --retriever, --model is the reranker"),
        (["--model", rr, "--retriever", rr], f"--retriever {rr}: a reranker (--task_type "
                                               "generative_reranker); --retriever takes an embedder"),
        (["--model", rr], f"--model {rr}: a reranker (--task_type generative_reranker); give "
                          "--retriever EMBEDDER"),
        (["--model", emb, "--query_instruction", "x"], "--query_instruction is the retriever's"),
        (["--model", rr, "--retriever", emb, "--top_k", "0"], "--top_k must be >= 1"),
        (["--model", rr, "--retriever", emb, "--mrl_dims", "16"], "--mrl_dims: with --retriever"),
        (["--model", rr, "--retriever", str(tmp_path / "none")], "--retriever"),
        (["--model", rr, "--retriever", emb, "--dataset", str(pairs)], "labelled pairs have no retrieval"),
    ]
    for flags, message in cases:
        dataset = [] if "--dataset" in flags else ["--dataset", beir]
        args = build_parser().parse_args(["eval", *dataset, *flags])
        with pytest.raises((ValueError, OSError)) as e:
            check_args(args)
        assert message in str(e.value) and "\n" not in str(e.value), (flags, str(e.value))
    # the command prints it as its one last line, exit code 2
    proc = subprocess.run([sys.executable, "-m", "megaemb.cli", "eval", "--model", emb, "--retriever",
                           emb, "--dataset", beir], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(
        f"megaemb eval: error: --model {emb}: an embedder"), proc.stderr


@pytest.mark.timeout(900)
def test_reranker_demo_runs(models, tmp_path):
    """demo/run_reranker_demo.py with a few steps and queries: untrained eval, LM pretraining,
    its eval, sft on the rows with other rows' positives, trained eval, and the nDCG@10 line
    (the full demo: 1,200 pretraining and 1,500 sft steps, 100 dev queries)."""
    proc = subprocess.run([sys.executable, "demo/run_reranker_demo.py", "--retriever", models["embedder"],
                           "--pretrain_steps", "3", "--train_iters", "2", "--queries", "12", "--nproc", "1", "--out",
                           str(tmp_path / "demo")], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT}, timeout=850)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before, pretrained, after = (json.loads((tmp_path / "demo" / f"eval-{n}.json").read_text())
                                 for n in ("untrained", "pretrained", "trained"))
    assert before["top_k"] == after["top_k"] == 20 and before["retriever"] == after["retriever"]
    assert pretrained["retriever"] == before["retriever"]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("nDCG@10 on 12 dev queries"))
    for value in (before["retriever"]["ndcg@10"], before["reranked"]["ndcg@10"],
                  pretrained["reranked"]["ndcg@10"], after["reranked"]["ndcg@10"]):
        assert f"{value:.4f}" in line, (line, value)
    assert "LM pretraining: 3 steps of 32 texts" in proc.stdout
    sft = next(l for l in proc.stdout.splitlines() if l.startswith("$ NPROC_PER_NODE=1 megaemb sft"))
    assert f"--model {tmp_path / 'demo' / 'lm-pretrained'} " in sft
    assert f"--dataset {tmp_path / 'demo' / 'train-with-other-positives.jsonl'} " in sft
    assert os.path.isfile(tmp_path / "demo" / "run" / "megaemb.json")


@pytest.mark.timeout(60)
def test_an_exported_reranker_is_refused_where_an_embedder_is_read(tmp_path):
    """``embed`` / ``mine`` / ``eval`` without ``--retriever`` read an embedder: an HF dir that
    declares itself a reranker (seq-cls architecture, or a sentence-transformers CrossEncoder
    as megaemb's export writes) is a one-line error; a bare ``*ForCausalLM`` stays an embedder."""
    from argparse import Namespace

    from megaemb import tasks
    from megaemb.cli import _load_for_inference
    from megaemb.preflight import exported_reranker

    def hf_dir(name, architecture, st=None):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"model_type": "qwen3", "architectures": [architecture]}))
        if st:
            (d / "config_sentence_transformers.json").write_text(json.dumps({"model_type": st}))
        return str(d)

    cross = hf_dir("cross", "Qwen3ForCausalLM", "CrossEncoder")
    assert exported_reranker(cross) is tasks.GENERATIVE_RERANKER
    assert exported_reranker(hf_dir("seqcls", "Qwen3ForSequenceClassification")) is tasks.RERANKER
    assert exported_reranker(hf_dir("bare", "Qwen3ForCausalLM")) is None
    assert exported_reranker(hf_dir("st", "Qwen3ForCausalLM", "SentenceTransformer")) is None
    with pytest.raises(ValueError, match=r"^--model .*cross: a reranker export \(--task_type "
                                         r"generative_reranker\); this command takes an embedder$"):
        _load_for_inference(Namespace(model=cross))
