"""Reranker batching and distillation under real gloo groups (one 1-process group runs the
default checks; the DP=2 comparisons, one 2-process group, are marked slow):

- ``--loss_type listwise_distill_reranker``: step 1's loss and the gradients of the output
  layer and the word embedding equal a plain-PyTorch KL (``F.kl_div``) over the official
  Qwen3-Reranker transformers snippet's scores (fp32, 1e-5), with temperatures != 1 and rows
  of two positives (two groups each, every candidate with its own teacher score); DP=2 gives
  DP=1's losses and gradients; a file where one row lacks ``scores`` is a ``file:line`` error.
- ``--max_tokens_per_micro_batch``: padded and packed, one rank and DP=2, give the plain
  split's losses and gradients, with micro-batches that hold whole rows within the budget.
- ``--split_dataset_ratio``: the rows held out are the embedding token store's
  (``torch.randperm`` seeded by ``--seed``), the rest train.
- ``--global_batch_size`` above the number of rows: the embedder's one-line error, naming rows.
"""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from distributed import run_distributed
from test_reranker_train import _cfg as _train_cfg
from test_reranker_train import _run
from test_train import _close

TOL = 1e-5
ROWS = 8
TEMPERATURE, TEACHER_TEMPERATURE = 0.5, 2.0
BUDGET = 1200  # tokens per micro-batch: more than any row's prompts, less than a rank's rows
ENV = {"LISTWISE_RERANKER_TEMPERATURE": str(TEMPERATURE),
       "LISTWISE_RERANKER_TEACHER_TEMPERATURE": str(TEACHER_TEMPERATURE),
       "MAX_POSITIVE_SAMPLES": "2"}  # every positive a group; MAX_NEGATIVE_SAMPLES 7 draws all


def _rows():
    """Rows with teacher scores: query/response rows and, every 4th, a messages row with two
    positives; 1 to 3 negatives."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(ROWS):
        negatives = [f"an unrelated library number {i + j}" for j in range(1 + i % 3)]
        if i % 4 == 3:
            user = lambda text: [{"role": "user", "content": text}]  # noqa: E731
            row = {"messages": user(f"package for task {i}"),
                   "positive_messages": [user(f"this package does task {i} well"),
                                         user(f"task {i} is what it is for")],
                   "negative_messages": [user(n) for n in negatives]}
            positives = [f"this package does task {i} well", f"task {i} is what it is for"]
        else:
            row = {"query": f"package for task {i}", "response": f"this package does task {i} well",
                   "rejected_response": negatives}
            positives = [row["response"]]
        scores = (torch.randn(len(positives) + len(negatives), generator=g) * 3).tolist()
        rows.append((row, f"package for task {i}", positives, negatives, scores))
    return rows


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    from megaemb.tiny import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("rerank-batch")
    rows = _rows()
    data, partial = root / "scored.jsonl", root / "partial.jsonl"
    data.write_text("".join(json.dumps({**r, "scores": s}) + "\n" for r, *_, s in rows))
    partial.write_text("".join(json.dumps({**r, "scores": s} if i != 2 else r) + "\n"
                               for i, (r, *_, s) in enumerate(rows)))
    return {"model": make_tiny_checkpoint(str(root / "untied"), seed=8, causal_lm=True),
            "data": str(data), "partial": str(partial), "root": str(root), "rows": rows}


def _cfg(model, data, **kw):
    """``test_reranker_train``'s settings, two steps."""
    return _train_cfg(model, data, **{"train_iters": 2, **kw})


def _error(cfg) -> str:
    from megaemb.train import Trainer

    try:
        Trainer(cfg)
    except ValueError as e:
        return str(e)
    return "no error"


# the same rows each step: at test_reranker_train's lr 1e-3 the second step overshoots
DISTILL = dict(loss_type="listwise_distill_reranker", val_dataset=[], lr=1e-4)


def _one_rank(rank, world, m):
    os.environ.update(ENV)
    from megaemb.train import Trainer

    out = {"distill": _run(_cfg(m["model"], m["data"], micro_batch_size=ROWS, **DISTILL)),
           "listwise": _run(_cfg(m["model"], m["data"], micro_batch_size=ROWS)),
           "budget": _budget_runs(m),
           "partial": _error(_cfg(m["model"], m["partial"], **DISTILL)),
           "too_big": _error(_cfg(m["model"], m["data"], global_batch_size=ROWS + 2,
                                  micro_batch_size=1))}
    trainer = Trainer(_cfg(m["model"], m["data"], val_dataset=[], split_dataset_ratio=0.3,
                           global_batch_size=2, micro_batch_size=1))
    out["split"] = {"train": [r.source for r in trainer.train.rows],
                    "eval": [r.source for r in trainer.train.eval_rows],
                    "metrics": sorted(trainer.evaluate())}
    return out


def _budget_runs(m) -> dict:
    """Listwise runs with micro-batches cut by a token budget (padded, packed): ``_run``'s
    steps, gradients and eval, and step 1's micro-batches: (texts, computed tokens) each,
    and the number of texts of each of this rank's rows."""
    from megaemb.train import Trainer

    out = {}
    for label, budget, packed in (("padded", BUDGET, False), ("packed", BUDGET, True)):
        seen = []
        forward_backward = Trainer.forward_backward

        def watch(self, rows, micro=None):
            result = forward_backward(self, rows, micro)
            seen.append((self.train.texts(rows), result.batches))
            return result
        Trainer.forward_backward = watch
        try:
            run = _run(_cfg(m["model"], m["data"], max_tokens_per_micro_batch=budget,
                            packing=packed, micro_batch_size=1))
        finally:
            Trainer.forward_backward = forward_backward
        texts, batches = seen[0]
        out[label] = {"run": run, "budget": budget, "row_texts": [len(t) for t in texts],
                      "micro": [(len(b.lengths), b.input_ids.numel()) for b in batches]}
    return out


def _two_ranks(rank, world, m):
    os.environ.update(ENV)
    return {"distill": _run(_cfg(m["model"], m["data"], micro_batch_size=1, **DISTILL)),
            "budget": _budget_runs(m)}


def _official_scores(model, tokenizer, query, documents):
    """The Qwen3-Reranker model card's prompt, one pair per forward (no padding):
    ``l_yes - l_no`` at the last position, with gradient."""
    prefix = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the "
              "Query and the Instruct provided. Note that the answer can only be \"yes\" or "
              "\"no\".<|im_end|>\n<|im_start|>user\n")
    suffix = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    task = "Given a web search query, retrieve relevant passages that answer the query"
    yes, no = tokenizer.convert_tokens_to_ids("yes"), tokenizer.convert_tokens_to_ids("no")
    scores = []
    for d in documents:
        ids = tokenizer.encode(f"{prefix}<Instruct>: {task}\n<Query>: {query}\n<Document>: {d}"
                               f"{suffix}", add_special_tokens=False)
        logits = model(torch.tensor([ids])).logits[0, -1]
        scores.append(logits[yes] - logits[no])
    return torch.stack(scores)


def _kl_reference(m):
    """Plain PyTorch: the mean over groups (one per positive: it and every negative) of
    KL(softmax(teacher / T_t) || softmax(scores / T)); loss and the HF gradients."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(m["model"], torch_dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(m["model"])
    terms = []
    for _, query, positives, negatives, teacher in m["rows"]:
        teacher = torch.tensor(teacher)
        for p, positive in enumerate(positives):
            scores = _official_scores(model, tokenizer, query, [positive, *negatives])
            t = torch.cat([teacher[p:p + 1], teacher[len(positives):]])
            terms.append(F.kl_div(F.log_softmax(scores / TEMPERATURE, dim=0),
                                  F.log_softmax(t / TEACHER_TEMPERATURE, dim=0),
                                  reduction="sum", log_target=True))
    loss = torch.stack(terms).mean()
    loss.backward()
    return float(loss), {"output_layer.weight": model.lm_head.weight.grad,
                         "embedding.word_embeddings.weight": model.model.embed_tokens.weight.grad}


def _grad_error(a: dict, b: dict, names=None) -> float:
    """Max |a - b| / max |b| over the parameters ``names`` (all of ``b``'s by default); ``a``'s
    rows beyond ``b``'s (megatron's vocabulary padding) must be zero."""
    worst = 0.0
    for k in names or b:
        x, y = a[k], b[k]
        assert not x[y.shape[0]:].any(), k
        worst = max(worst, float((x[:y.shape[0]] - y).abs().max() / y.abs().max()))
    return worst


@pytest.fixture(scope="module")
def one_rank(scored):
    return run_distributed(_one_rank, 1, scored, timeout=600)[0]


def _budget_report(world: str, runs: dict, plain: dict) -> dict:
    """Token-budget runs vs the plain split (micro-batch = the global batch): losses, gradient
    norms, gradients, eval; and the cut: several micro-batches of as many whole rows (all the
    candidates of each), every one within the budget."""
    plain_grads, report = torch.load(plain["grads"]), {}
    for label, b in runs.items():
        report[f"{world} {label} budget"] = _close(b["run"]["steps"], plain["steps"])
        report[f"{world} {label} budget grads"] = _grad_error(torch.load(b["run"]["grads"]),
                                                              plain_grads)
        report[f"{world} {label} eval"] = max(abs(b["run"]["eval"][k] - v)
                                              for k, v in plain["eval"].items())
        count, rows = len(b["micro"]), len(b["row_texts"])
        assert 1 < count < rows and rows % count == 0, (world, label, b["micro"])
        per = rows // count
        assert [n for n, _ in b["micro"]] == [sum(b["row_texts"][i:i + per])
                                              for i in range(0, rows, per)], (world, label, b)
        assert all(tokens <= b["budget"] for _, tokens in b["micro"]), (world, label, b)
    return report


@pytest.mark.timeout(900)
def test_distill_budget_and_split_one_rank(scored, one_rank):
    one = one_rank
    # distillation vs plain PyTorch on the official snippet's scores
    ref_loss, ref_grads = _kl_reference(scored)
    distill = one["distill"]
    report = {"kl loss": abs(distill["steps"][0][1] - ref_loss) / ref_loss,
              "kl grads": _grad_error(torch.load(distill["grads"]), ref_grads),
              **_budget_report("dp1", one["budget"], one["listwise"])}
    print({k: f"{v:.1e}" for k, v in report.items()}, f"KL loss {ref_loss:.4f}")
    assert max(report.values()) <= TOL, report
    assert ref_loss > 0.05 and distill["steps"][-1][1] < distill["steps"][0][1]  # it learns

    assert one["partial"].startswith(f"{scored['partial']}:3: field 'scores': missing: "
                                     "listwise_distill_reranker needs"), one["partial"]
    assert one["too_big"] == (
        f"--global_batch_size {ROWS + 2} is larger than the {ROWS} training rows (a query with all "
        "the candidates it draws): one step would hold examples more than once; lower it, or "
        "repeat the data on purpose with --dataset PATH#N (N examples)"), one["too_big"]

    # --split_dataset_ratio 0.3 of 8 rows: the first int(2.4) = 2 of randperm(8, seed 42)
    order = torch.randperm(ROWS, generator=torch.Generator().manual_seed(42)).tolist()
    src = scored["data"]
    assert one["split"]["eval"] == [f"{src}:{i + 1}" for i in order[:2]], one["split"]
    assert one["split"]["train"] == [f"{src}:{i + 1}" for i in sorted(order[2:])], one["split"]
    assert one["split"]["metrics"], one["split"]  # the held-out rows are evaluated


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_dp2_distill_and_budget_equal_one_rank(scored, one_rank):
    two = run_distributed(_two_ranks, 2, scored, timeout=600)[0]
    distill = one_rank["distill"]
    report = {"dp2 distill": _close(two["distill"]["steps"], distill["steps"]),
              "dp2 distill grads": _grad_error(torch.load(two["distill"]["grads"]),
                                               torch.load(distill["grads"])),
              **_budget_report("dp2", two["budget"], one_rank["listwise"])}
    print({k: f"{v:.1e}" for k, v in report.items()}, two["distill"]["steps"], distill["steps"])
    assert max(report.values()) <= TOL, report
