"""The megaemb reranker demo: a tiny Qwen3-Reranker-shaped model (real Qwen3 tokenizer, random
weights) reranks an embedder's top-20 on the debian-desc dev slice (`megaemb eval
--retriever`), is trained on the train slice (`megaemb sft --task_type generative_reranker`,
configs/demo-reranker-cpu.yaml), and reranks again: nDCG@10 of the retriever alone, of the
untrained and of the trained reranker.

    python demo/run_reranker_demo.py [--retriever DIR] [--train_iters N] [--queries N]

The retriever defaults to the embedder that demo/run_demo.py trains (demo_out/run/hf_model);
run_demo.py runs this stage itself at its end."""
import argparse
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run_demo import OUT, ROOT, megaemb  # noqa: E402

DEV = os.path.join(ROOT, "demo", "data", "dev.jsonl")


def rerank_eval(model: str, retriever: str, queries: int, out: str, nproc: int) -> dict:
    """``megaemb eval --retriever``'s JSON, written to ``out`` (its table is printed)."""
    megaemb("eval", "--model", model, "--retriever", retriever, "--top_k", "20",
            "--dataset", f"{DEV}#{queries}", "--max_length", "160", "--output", out,
            "--overwrite", "true", nproc=nproc)
    with open(out) as f:
        return json.load(f)


def run(retriever: str, root: str = os.path.join(OUT, "reranker"), train_iters: int = 750,
        queries: int = 100, nproc: int = 2) -> dict:
    """The stage, writing under ``root`` (emptied first): returns nDCG@10 of the retriever,
    the untrained and the trained reranker."""
    from megaemb.tiny import make_tiny_checkpoint

    shutil.rmtree(root, ignore_errors=True)
    untrained = make_tiny_checkpoint(os.path.join(root, "tiny-qwen3-reranker"), seed=0, causal_lm=True)
    before = rerank_eval(untrained, retriever, queries, os.path.join(root, "eval-untrained.json"), nproc)
    run_dir = os.path.join(root, "run")
    megaemb("sft", "--config", "configs/demo-reranker-cpu.yaml", "--model", untrained,
            "--train_iters", str(train_iters), "--save_interval", str(train_iters), "--save", run_dir,
            nproc=nproc)
    after = rerank_eval(run_dir, retriever, queries, os.path.join(root, "eval-trained.json"), nproc)
    ndcg = {"retriever": before["retriever"]["ndcg@10"], "untrained": before["reranked"]["ndcg@10"],
            "trained": after["reranked"]["ndcg@10"]}
    print(f"nDCG@10 on {queries} dev queries, the retriever's top 20: retriever alone "
          f"{ndcg['retriever']:.4f}, reranked by the untrained reranker {ndcg['untrained']:.4f}, "
          f"by the reranker trained {train_iters} steps {ndcg['trained']:.4f}", flush=True)
    return ndcg


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--retriever", default=os.path.join(OUT, "run", "hf_model"),
                   help="an embedder (HF dir or megaemb checkpoint); default: run_demo.py's")
    p.add_argument("--train_iters", type=int, default=750)
    p.add_argument("--queries", type=int, default=100, help="dev queries to evaluate")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--out", default=os.path.join(OUT, "reranker"), help="folder to write (emptied first)")
    args = p.parse_args(argv)
    if not os.path.isdir(args.retriever):
        p.error(f"--retriever {args.retriever}: no such directory (run demo/run_demo.py first, "
                "or give an embedder)")
    run(args.retriever, args.out, args.train_iters, args.queries, args.nproc)


if __name__ == "__main__":
    main()
