"""Score parity across layouts: a Qwen3-Reranker-shaped HF checkpoint loaded by megaemb at
TP=2, PP=2 (tied embeddings: the last stage's copy of the word embedding) and EP=2 (a
Qwen3-MoE reranker) scores (query, document) pairs as the model card's transformers snippet
does: ``l_yes - l_no`` within 1e-5 (fp32), through ``eval --retriever``'s pair scorer (one
2-process group runs every layout)."""
import math

import pytest

from distributed import run_distributed
from test_reranker_export import _official_scores

TOL = 1e-5
QUERIES = ["package for task 1", "a text editor", "compress files"]
DOCS = [["this package does task 1 well", "an unrelated library", "x"],
        ["GNU Emacs is an extensible, customizable text editor, and more", "a game", "vim"],
        ["gzip reduces the size of files", "a font", "xz-utils: XZ-format compression utilities"]]
LAYOUTS = [  # label, model, ParallelConfig overrides
    ("tp2", "untied", dict(tensor_model_parallel_size=2)),
    ("tp2-sp-packed", "tied", dict(tensor_model_parallel_size=2, sequence_parallel=True)),
    ("pp2-tied", "tied", dict(pipeline_model_parallel_size=2)),
    ("pp2", "untied", dict(pipeline_model_parallel_size=2)),
    ("ep2-moe", "moe", dict(expert_model_parallel_size=2)),
]


@pytest.fixture(scope="module")
def rerankers(tmp_path_factory):
    from megaemb.tiny import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("parity")
    return {"untied": make_tiny_checkpoint(str(root / "untied"), seed=11, causal_lm=True),
            "tied": make_tiny_checkpoint(str(root / "tied"), seed=12, causal_lm=True, tied=True),
            "moe": make_tiny_checkpoint(str(root / "moe"), seed=13, causal_lm=True, moe=True)}


def _scores(rank, world, models):
    """Rank 0: ``{label: [nq, k] scores}`` of every layout (each loads its model afresh; the
    model-parallel groups are rebuilt, the process group stays)."""
    from megaemb import tasks
    from megaemb.config import ParallelConfig
    from megaemb.convert.load import load_model
    from megaemb.parallel import init_parallel

    out = {}
    for label, name, kw in LAYOUTS:
        parallel = ParallelConfig(**kw)
        init_parallel(parallel)
        loaded = load_model(models[name], parallel, task=tasks.GENERATIVE_RERANKER, attention="sdpa")
        loaded.model.eval()
        scorer = loaded.task.make_pair_scorer(loaded.model, loaded.hf_dir, 256, None)
        scores = scorer.score(QUERIES, DOCS, source="test", batch_size=4,
                              packed=kw.get("sequence_parallel", False) or None)
        out[label] = None if scores is None else scores.tolist()
        del loaded, scorer
    return out


@pytest.mark.timeout(600)
def test_scores_equal_the_model_card_snippet_in_every_layout(rerankers):
    got = run_distributed(_scores, 2, rerankers, timeout=540)[0]
    pairs = [(q, d) for q, docs in zip(QUERIES, DOCS) for d in docs]
    report = {}
    for label, name, _ in LAYOUTS:
        p_yes = _official_scores(rerankers[name], pairs)[0].double()
        official = (p_yes / (1 - p_yes)).log().tolist()  # l_yes - l_no
        ours = [s for row in got[label] for s in row]
        assert len(ours) == len(official) == 9
        report[label] = max(abs(a - b) for a, b in zip(ours, official))
        # a comparison of equals: the scores spread (random weights give small ones)
        assert max(official) - min(official) > 1e-3 and all(math.isfinite(s) for s in ours)
    print({k: f"{v:.1e}" for k, v in report.items()})
    assert max(report.values()) <= TOL, report
