"""The megaemb reranker demo: a tiny Qwen3-Reranker-shaped model (real Qwen3 tokenizer, random
weights) reranks an embedder's top-20 on the debian-desc dev slice (`megaemb eval
--retriever`), is trained on the train slice, and reranks again: nDCG@10 of the retriever
alone, of the untrained, the LM-pretrained and the trained reranker.

Training has two stages, as Qwen3-Reranker starts from a pretrained Qwen3 base:
1. causal-LM pretraining on the train slice's own texts (pretrain_reranker_lm.py, plain
   transformers);
2. `megaemb sft --task_type generative_reranker` (configs/demo-reranker-cpu.yaml, listwise),
   on the train slice with each row's group grown by two other rows' positives as negatives
   (`with_other_positives`), which keeps the model from learning a score of the document alone.

    python demo/run_reranker_demo.py [--retriever DIR] [--pretrain_steps N] [--train_iters N] [--queries N]

The retriever defaults to the embedder that demo/run_demo.py trains (demo_out/run/hf_model);
run_demo.py runs this stage itself at its end."""
import argparse
import json
import os
import random
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pretrain_reranker_lm import pretrain  # noqa: E402
from run_demo import OUT, ROOT, guarded, megaemb  # noqa: E402

DEV = os.path.join(ROOT, "demo", "data", "dev.jsonl")
TRAIN = os.path.join(ROOT, "demo", "data", "train.jsonl")
MARKER = ".megaemb-reranker-demo"  # in an --out this stage made: it may empty it again


def check_replaceable(root: str, retriever: str) -> None:
    """Raise ``FileExistsError`` unless ``root`` may be emptied: absent, empty or made by this
    stage (``MARKER``), and not holding the retriever."""
    if os.path.exists(root) and not os.path.isdir(root):
        raise FileExistsError(f"--out {root}: not a directory")
    if os.path.isdir(root) and os.listdir(root) and not os.path.isfile(os.path.join(root, MARKER)):
        raise FileExistsError(f"--out {root} is not empty and not an earlier run of this demo; "
                              "the demo empties --out, so give another")
    inside = os.path.relpath(os.path.realpath(retriever), os.path.realpath(root))
    if inside == os.curdir or not inside.startswith(os.pardir):
        raise FileExistsError(f"--retriever {retriever} lies inside --out {root}, which the demo empties")


def with_other_positives(src: str, dst: str, k: int = 2, seed: int = 0) -> str:
    """Write ``src``'s rows to ``dst`` with ``k`` other rows' positives appended to each row's
    ``rejected_response``: rows in a shuffled cycle, each takes the positives of the ``k`` rows
    after it, so every positive is also a negative ``k`` times (``src``'s positives must be
    distinct). Returns ``dst``."""
    rows = [json.loads(line) for line in open(src, encoding="utf-8") if line.strip()]
    if len({r["response"] for r in rows}) != len(rows):
        raise ValueError(f"{src}: positives are not distinct")
    cycle = list(range(len(rows)))
    random.Random(seed).shuffle(cycle)
    with open(dst, "w", encoding="utf-8") as f:
        for at, i in enumerate(cycle):
            others = [rows[cycle[(at + j) % len(rows)]]["response"] for j in range(1, k + 1)]
            f.write(json.dumps({**rows[i], "rejected_response": rows[i]["rejected_response"] + others}) + "\n")
    return dst


def rerank_eval(model: str, retriever: str, queries: int, out: str, nproc: int) -> dict:
    """``megaemb eval --retriever``'s JSON, written to ``out`` (its table is printed)."""
    megaemb("eval", "--model", model, "--retriever", retriever, "--top_k", "20",
            "--dataset", f"{DEV}#{queries}", "--max_length", "160", "--output", out,
            "--overwrite", "true", nproc=nproc)
    with open(out) as f:
        return json.load(f)


def run(retriever: str, root: str = os.path.join(OUT, "reranker"), train_iters: int = 1500,
        queries: int = 100, nproc: int = 2, pretrain_steps: int = 1200) -> dict:
    """The stage, writing under ``root`` (emptied first): returns nDCG@10 of the retriever,
    the untrained, the LM-pretrained and the trained reranker."""
    from megaemb.tiny import make_tiny_checkpoint

    root = os.path.abspath(root)
    check_replaceable(root, retriever)
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    open(os.path.join(root, MARKER), "w").close()
    untrained = make_tiny_checkpoint(os.path.join(root, "tiny-qwen3-reranker"), seed=0, causal_lm=True)
    before = rerank_eval(untrained, retriever, queries, os.path.join(root, "eval-untrained.json"), nproc)
    lm = os.path.join(root, "lm-pretrained")
    pretrain(untrained, lm, TRAIN, steps=pretrain_steps)
    pretrained = rerank_eval(lm, retriever, queries, os.path.join(root, "eval-pretrained.json"), nproc)
    data = with_other_positives(TRAIN, os.path.join(root, "train-with-other-positives.jsonl"))
    run_dir = os.path.join(root, "run")
    megaemb("sft", "--config", "configs/demo-reranker-cpu.yaml", "--model", lm, "--dataset", data,
            "--train_iters", str(train_iters), "--save_interval", str(train_iters), "--save", run_dir,
            nproc=nproc)
    after = rerank_eval(run_dir, retriever, queries, os.path.join(root, "eval-trained.json"), nproc)
    ndcg = {"retriever": before["retriever"]["ndcg@10"], "untrained": before["reranked"]["ndcg@10"],
            "pretrained": pretrained["reranked"]["ndcg@10"], "trained": after["reranked"]["ndcg@10"]}
    print(f"nDCG@10 on {queries} dev queries, the retriever's top 20: retriever alone "
          f"{ndcg['retriever']:.4f}; reranked by the untrained reranker {ndcg['untrained']:.4f}, "
          f"after {pretrain_steps} LM-pretraining steps {ndcg['pretrained']:.4f}, after "
          f"{train_iters} more reranker steps {ndcg['trained']:.4f}", flush=True)
    return ndcg


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--retriever", default=os.path.join(OUT, "run", "hf_model"),
                   help="an embedder (HF dir or megaemb checkpoint); default: run_demo.py's")
    p.add_argument("--pretrain_steps", type=int, default=1200, help="causal-LM pretraining steps")
    p.add_argument("--train_iters", type=int, default=1500, help="megaemb sft steps")
    p.add_argument("--queries", type=int, default=100, help="dev queries to evaluate")
    p.add_argument("--nproc", type=int, default=2, choices=(1, 2),
                   help="processes (the config's global batch of 8 is micro-batches of 4 per rank)")
    p.add_argument("--out", default=os.path.join(OUT, "reranker"),
                   help="folder to write: absent, empty, or an earlier run of this demo (emptied first)")
    args = p.parse_args(argv)
    for flag in ("pretrain_steps", "train_iters", "queries"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    dev_queries = sum(1 for line in open(DEV, encoding="utf-8") if line.strip())
    if args.queries > dev_queries:
        p.error(f"--queries {args.queries}: the dev slice has {dev_queries}")
    if not args.out:
        p.error("--out: give a folder")
    if not os.path.isdir(args.retriever):
        p.error(f"--retriever {args.retriever}: no such directory (run demo/run_demo.py first, "
                "or give an embedder)")
    retriever, out = os.path.abspath(args.retriever), os.path.abspath(args.out)
    guarded("demo/run_reranker_demo.py", out, lambda: run(retriever, out, args.train_iters, args.queries,
                                                          args.nproc, args.pretrain_steps))

if __name__ == "__main__":
    main()
