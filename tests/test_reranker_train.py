"""``megaemb sft --task_type generative_reranker`` and ``--task_type reranker`` (the seq-cls
head) under real gloo groups: a tiny reranker learns, and every parallel layout (DP=2, TP=2,
TP=2+SP packed, PP=2, tied TP=2, tied PP=2, a Qwen3-MoE reranker's EP=2; seq-cls: DP=2 padded
and packed, TP=2+SP packed, PP=2) gives the losses and gradient norms of TP=PP=DP=1 (fp32,
1e-5), the DP=2, tied PP=2 (both stages' copies of the word embedding) and EP=2 layouts also
step 1's gradients, and the in-loop eval's metrics after training; the checkpoint records its
task, so loading it builds the reranker and an embedder run refuses it.
"""
import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch

from distributed import run_distributed
from test_train import ROOT, _close

TOL = 1e-5
ROWS = 8  # distinct queries: every step sees each of them (global batch 8)


def write_group_rows(path, rows: int, spread: int) -> str:
    """``rows`` group rows ``{query, response, rejected_response}``, row ``i`` with
    ``1 + i % spread`` negatives, written to ``path``."""
    path.write_text("".join(json.dumps(
        {"query": f"package for task {i}", "response": f"this package does task {i} well",
         "rejected_response": [f"an unrelated library number {i + j}" for j in range(1 + i % spread)]})
        + "\n" for i in range(rows)))
    return str(path)


@pytest.fixture(scope="module")
def rerankers(tmp_path_factory):
    """Tiny random Qwen3ForCausalLM checkpoints (untied with lm_head, tied), an untied
    Qwen3MoeForCausalLM (4 experts, top 2) and group rows of
    1 to 3 negatives (so a micro-batch's mean is not the global batch's: the DP weighting counts)."""
    from megaemb.tiny import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("rerankers")
    data = write_group_rows(root / "groups.jsonl", ROWS, 3)
    return {"untied": make_tiny_checkpoint(str(root / "untied"), seed=4, causal_lm=True),
            "tied": make_tiny_checkpoint(str(root / "tied"), seed=5, causal_lm=True, tied=True),
            "moe": make_tiny_checkpoint(str(root / "moe"), seed=6, causal_lm=True, moe=True),
            "data": data, "root": str(root)}


def _cfg(model, data, **kw):
    from megaemb.config import SFTConfig

    base = dict(model=model, dataset=[data], val_dataset=[data], task_type="generative_reranker",
                loss_type="listwise_reranker", max_length=96, micro_batch_size=2,
                global_batch_size=ROWS, train_iters=3, lr=1e-3, clip_grad=1e9, log_interval=1,
                seed=42)
    return SFTConfig(**{**base, **kw})


def _run(cfg) -> dict:
    """Steps [(step, loss, grad_norm)], step 1's gradients (global parameter name -> this
    rank's tensor, via a file; the last stage's tied copy ``output_layer.weight``) and the
    in-loop eval's scores after the last step."""
    from megaemb.train import Trainer

    trainer, steps = Trainer(cfg), []
    for trainer.step in range(cfg.train_iters):
        stats = trainer.train_step()
        steps.append((trainer.step + 1, stats["loss"], stats["grad_norm"]))
        if trainer.step == 0:
            grads = _global_grads(trainer.model.module)
    fd, path = tempfile.mkstemp(suffix=".pt", dir=os.path.dirname(cfg.dataset[0]))
    os.close(fd)
    torch.save(grads, path)
    if cfg.save:
        trainer.save()
    return {"steps": steps, "grads": path, "eval": trainer.evaluate()}


_REFS = [("untied", "generative_reranker"), ("tied", "generative_reranker"),
         ("moe", "generative_reranker"), ("untied", "reranker")]


def _global_grads(model) -> dict:
    """``main_grad`` of each parameter under its checkpoint name (global layer and expert
    indices: a pipeline stage's or an expert-parallel rank's share of TP=PP=EP=1's)."""
    from megaemb.convert.hf_to_mcore import global_index
    from megaemb.convert.mapping import find_mapping, qwen3_mappings

    table, out = qwen3_mappings(model.shape, output_layer="lm_head"), {}
    for name, p in model.named_parameters():
        if name != "output_layer.weight":
            _, local = find_mapping(table, name)
            index = global_index(model, local)
            if "layer" in local:
                name = name.replace(f"layers.{local['layer']}.", f"layers.{index['layer']}.", 1)
            if "expert" in local:
                name = name.replace(f"local_experts.{local['expert']}.",
                                    f"local_experts.{index['expert']}.", 1)
        out[name] = p.main_grad.detach().clone()
    return out


def _ref_path(m, name, task, loss) -> str:
    return os.path.join(m["root"], f"ref-{name}-{task}-{loss}")


def _references(rank, world, m):
    out = {}
    for name, task in _REFS:
        for loss in ("listwise_reranker", "pointwise_reranker"):
            save = _ref_path(m, name, task, loss) if name != "moe" else ""
            out[name, task, loss] = _run(_cfg(m[name], m["data"], loss_type=loss, task_type=task,
                                              micro_batch_size=ROWS, save=save))
    return out


_SEQ_CLS = dict(task_type="reranker")  # from the causal LM: its classifier starts as W[yes]-W[no]
_LAYOUTS = [  # label, model, overrides
    ("dp2", "untied", {}),
    ("dp2-packed", "untied", dict(packing=True, micro_batch_size=1)),
    ("tp2", "untied", dict(tensor_model_parallel_size=2)),
    ("tp2-sp-packed", "untied", dict(tensor_model_parallel_size=2, sequence_parallel=True,
                                     packing=True)),
    ("pp2", "untied", dict(pipeline_model_parallel_size=2)),
    ("tied-tp2", "tied", dict(tensor_model_parallel_size=2)),
    ("tied-dp2", "tied", {}),
    ("seqcls-dp2", "untied", _SEQ_CLS),
    ("seqcls-dp2-packed", "untied", dict(**_SEQ_CLS, packing=True, micro_batch_size=1)),
    ("seqcls-tp2-sp-packed", "untied", dict(**_SEQ_CLS, tensor_model_parallel_size=2,
                                            sequence_parallel=True, packing=True)),
    ("seqcls-pp2", "untied", dict(**_SEQ_CLS, pipeline_model_parallel_size=2)),
    ("tied-pp2", "tied", dict(pipeline_model_parallel_size=2)),
    ("moe-ep2", "moe", dict(expert_model_parallel_size=2)),
]
_GRADS = ("dp2", "dp2-packed", "tied-dp2", "tied-pp2", "moe-ep2", "seqcls-dp2", "seqcls-dp2-packed")  # layouts whose step-1 gradients are compared


def _layouts(rank, world, m):
    out = {(label, loss): _run(_cfg(m[name], m["data"], loss_type=loss, save=_saved(m, label, loss),
                                    **kw))
           for label, name, kw in _LAYOUTS
           for loss in ("listwise_reranker", "pointwise_reranker")}
    out["reload"] = _reload_tied(m)
    return out


def _saved(m, label, loss) -> str:
    return os.path.join(m["root"], f"{label}-{loss}") if label == "tied-pp2" else ""


def _reload_tied(m) -> float:
    """Collective (PP=2): the tied PP=2 run's checkpoint (the last stage's copy saved as a
    replica of the word embedding) and world 1's, both loaded at PP=2: max relative
    difference of this stage's ``W`` (the word embedding, or the last stage's copy)."""
    from megaemb import tasks
    from megaemb.config import ParallelConfig
    from megaemb.convert.load import load_model
    from megaemb.parallel import init_parallel

    parallel = ParallelConfig(pipeline_model_parallel_size=2)
    init_parallel(parallel)
    got, ref = (load_model(path, parallel, task=tasks.GENERATIVE_RERANKER)
                .model.shared_embedding_or_output_weight()
                for path in (_saved(m, "tied-pp2", "listwise_reranker"),
                             _ref_path(m, "tied", "generative_reranker", "listwise_reranker")))
    return float((got - ref).abs().max() / ref.abs().max())


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_reranker_learns_and_layouts_equal_one_rank(rerankers):
    refs = run_distributed(_references, 1, rerankers, timeout=500)[0]
    ranks = run_distributed(_layouts, 2, rerankers, timeout=1500)
    report = {}
    reloads = [rank.pop("reload") for rank in ranks]
    for (label, loss), r in ranks[0].items():
        name, kw = next((n, kw) for lab, n, kw in _LAYOUTS if lab == label)
        ref = refs[name, kw.get("task_type", "generative_reranker"), loss]
        report[label, loss] = {"loss": _close(r["steps"], ref["steps"]),
                               "eval": max(abs(r["eval"][k] - v) for k, v in ref["eval"].items())}
        if label in _GRADS:  # each rank's parameters (PP: a stage's, EP: its experts) vs world 1's
            b = torch.load(ref["grads"])
            report[label, loss]["grads"] = max(
                _grad_diff(torch.load(rank[label, loss]["grads"]), b) for rank in ranks)
    print({k: {n: f"{x:.1e}" for n, x in v.items()} for k, v in report.items()}, reloads)
    assert max(reloads) <= TOL, reloads
    for key, r in report.items():
        assert max(r.values()) <= TOL, (key, r)
    for key, ref in refs.items():  # it learns: the loss of the same 8 queries falls
        losses = [s[1] for s in ref["steps"]]
        assert losses[-1] < losses[0] - 0.02, (key, losses)
    # the output layer is trained (untied): its gradient reaches the yes/no rows only
    g = torch.load(refs["untied", "generative_reranker", "listwise_reranker"]["grads"])
    assert set(torch.nonzero(g["output_layer.weight"].abs().sum(1)).flatten().tolist()) == {9693, 2152}
    # the seq-cls classifier [1, h] is trained
    g = torch.load(refs["untied", "reranker", "listwise_reranker"]["grads"])["output_layer.weight"]
    assert g.shape == (1, 64) and float(g.abs().max()) > 0
    for task in ("generative_reranker", "reranker"):
        _check_checkpoint(_ref_path(rerankers, "untied", task, "listwise_reranker"), rerankers, task)


def _grad_diff(got: dict, ref: dict) -> float:
    """Max relative difference of ``got``'s gradients from world 1's ``ref``; a tied model's
    last-stage copy ``output_layer.weight`` must equal the word embedding's (its all-reduced
    gradient: the lookup's and the head's); each rank must hold a part of the model."""
    tied = "output_layer.weight" in got and "output_layer.weight" not in ref
    names = {k: "embedding.word_embeddings.weight" if tied and k == "output_layer.weight" else k
             for k in got}
    assert len(got) >= 3 and set(names.values()) <= set(ref), sorted(set(names.values()) - set(ref))
    return max(float((got[k] - ref[n]).abs().max() / ref[n].abs().max().clamp_min(1e-30))
               for k, n in names.items())


def _check_checkpoint(path, m, task):
    """megaemb.json records the task; an embedder run (--load, --save to resume, --model) and
    ``embed`` of the reranker checkpoint are one-line errors, before any data is read."""
    with open(os.path.join(path, "megaemb.json")) as f:
        assert json.load(f)["task"] == task
    env = {**os.environ, "PYTHONPATH": ROOT}
    sft = ["sft", "--dataset", m["data"], "--train_iters", "1", "--global_batch_size", "2",
           "--max_length", "96", "--loss_type", "infonce"]
    texts = os.path.join(m["root"], "texts.txt")
    with open(texts, "w") as f:
        f.write("a text\n")
    for args in ([*sft, "--model", m["untied"], "--load", path], [*sft, "--model", path],
                 [*sft, "--model", m["untied"], "--save", path],
                 ["embed", "--model", path, "--input", texts, "--output",
                  os.path.join(m["root"], "e.npy")]):
        proc = subprocess.run([sys.executable, "-m", "megaemb.cli", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and lines[-1].startswith(f"megaemb {args[0]}: error: "), \
            proc.stderr
        assert f"a checkpoint of --task_type {task}, not embedding" in lines[-1], lines[-1]
        assert "train data" not in proc.stdout + proc.stderr, proc.stdout[-2000:]


@pytest.mark.parametrize("flags, message", [
    (["--loss_type", "infonce"], "--loss_type 'infonce': expected one of 'pointwise_reranker'"),
    ([], "with --task_type generative_reranker .'infonce' is the default, the embedder's"),
    (["--loss_type", "listwise_reranker", "--global_negatives", "true"],
     "--global_negatives is not supported with --task_type generative_reranker"),
    (["--loss_type", "listwise_reranker", "--task_type", "cross_encoder"],
     "--task_type 'cross_encoder': expected one of 'embedding', 'generative_reranker', 'reranker'"),
    (["--loss_type", "infonce", "--task_type", "reranker"],
     "--loss_type 'infonce': expected one of 'pointwise_reranker'"),
])
@pytest.mark.timeout(120)
def test_bad_reranker_flags_are_one_line(flags, message, tmp_path):
    from megaemb.cli import build_parser, sft_config

    args = build_parser().parse_args(["sft", "--model", str(tmp_path), "--dataset", "x.jsonl",
                                      "--train_iters", "1", "--task_type",
                                      "generative_reranker", *flags])
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        sft_config(args).validate()


@pytest.mark.timeout(60)
def test_instruction_is_refused_for_embedders(tmp_path):
    from megaemb.config import SFTConfig

    with pytest.raises(ValueError, match="--instruction is not supported with --task_type embedding"):
        SFTConfig(model=str(tmp_path), dataset=["x"], train_iters=1, instruction="judge").validate()
