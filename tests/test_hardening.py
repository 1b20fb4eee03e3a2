"""Regressions of the hardening issue, on real gloo process groups (CPU, fp32 unless stated).

* bf16 ``--finetune`` trains from the loaded weights (the optimizer's fp32 main copies are
  refreshed after the load), not from ``--model``'s.
* ``embed`` / eval with expert parallelism: data-parallel ranks run equal numbers of forward
  steps (33 texts, batch 16 used to deadlock) and rows come back in input order.
* Resume under another layout (TP, PP, DP, distributed optimizer) continues the saved run's
  loss trajectory; switching the optimizer kind is refused with one line.
* ``--save`` holding a run resumes it; a finished run only evaluates; a fresh run over it is
  refused; the final HF export runs as one plain process even inside a Slurm allocation.
* Every shipped config trains one step on the tiny model (parallel sizes overridden).
"""
import glob
import os
import shutil
import subprocess
import sys

import pytest
import torch

from distributed import run_distributed
from test_train import _cfg as train_cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "demo", "data", "train.jsonl")
TOL = 1e-5  # relative, on losses


def _cfg(model, **kw):
    """test_train's tiny config, 4 steps by default."""
    return train_cfg(model, **{"train_iters": 4, **kw})


def _train(model, **kw):
    from megaemb.train import Trainer

    return Trainer(_cfg(model, **kw)).run()["losses"]


# ------------------------------------------------------------------------------ bf16 finetune

def _bf16_finetune(rank, world, model, tmp):
    from megaemb.train import Trainer

    first = Trainer(_cfg(model, bf16=True, train_iters=1, lr=1e-2, save=f"{tmp}/a"))
    first.run()
    tuned = Trainer(_cfg(model, bf16=True, train_iters=1, lr=1e-12, load=f"{tmp}/a", finetune=True))
    tuned.run()
    from megaemb.config import ParallelConfig
    from megaemb.convert.load import load_model

    base = load_model(model, ParallelConfig(), bf16=True).model.state_dict()
    a = {k: v for k, v in first.module.state_dict().items() if torch.is_tensor(v)}
    b = {k: v for k, v in tuned.module.state_dict().items() if torch.is_tensor(v)}
    return {"equal_to_loaded": all(torch.equal(a[k], b[k]) for k in a),
            "moved_from_base": sum(not torch.equal(base[k], b[k]) for k in a if k in base),
            "dtype": str(b["decoder.final_layernorm.weight"].dtype)}


@pytest.mark.timeout(300)
def test_bf16_finetune_keeps_loaded_weights(tiny_models, tmp_path):
    out = run_distributed(_bf16_finetune, 1, tiny_models["dense"], str(tmp_path), timeout=240)[0]
    assert out["dtype"] == "torch.bfloat16", out
    assert out["equal_to_loaded"] and out["moved_from_base"] > 0, out


# ------------------------------------------------------------------------------ EP embed

TEXTS = [f"text number {i} " + "word " * (i % 7) for i in range(33)]


def _embed_group(rank, world, models):
    from megaemb.config import ParallelConfig
    from megaemb.convert.load import load_model
    from megaemb.data.tokenize import EmbeddingTokenizer
    from megaemb.embed import embed_texts
    from megaemb.parallel import init_parallel

    out = {}
    for name, parallel in [("moe", ParallelConfig(expert_model_parallel_size=2)), ("dense", ParallelConfig())]:
        init_parallel(parallel)
        loaded = load_model(models[name], parallel)
        tok = EmbeddingTokenizer(loaded.hf_dir, 64)
        out[name] = embed_texts(loaded.model, tok, TEXTS, batch_size=16)
    return out


@pytest.mark.timeout(300)
def test_embed_with_expert_parallel_does_not_deadlock(tiny_models):
    from hf_reference import compare, hf_embeddings

    from megaemb.data.batching import pad_batch
    from megaemb.data.tokenize import EmbeddingTokenizer

    got = run_distributed(_embed_group, 2, tiny_models, timeout=180)
    assert got[1] == {"moe": None, "dense": None}
    for name in ("moe", "dense"):
        tok = EmbeddingTokenizer(tiny_models[name], 64)
        batch = pad_batch(tok.encode(TEXTS), tok.pad_id)
        ids, lengths = batch.input_ids, batch.lengths
        stats = compare(torch.as_tensor(got[0][name]), hf_embeddings(tiny_models[name], ids, lengths))
        assert got[0][name].shape == (33, 64) and stats["cos_min"] >= 0.99999, (name, stats)


# ------------------------------------------------------------------------------ resume layouts

def _cut(save, cut):
    """A copy of a 4-step run as it was after its step-2 save."""
    shutil.copytree(save, cut)
    shutil.rmtree(os.path.join(cut, "iter_0000004"))
    open(os.path.join(cut, "latest_checkpointed_iteration.txt"), "w").write("2")
    return cut


# (label, run kwargs, world) of the uninterrupted runs, and the layout each is resumed under.
# DP=2 with micro-batch 2 sees the same 4 in-batch candidates as DP=1 with micro-batch 4.
_RUNS = {"tp2": (dict(tensor_model_parallel_size=2), 2),
         "pp2": (dict(pipeline_model_parallel_size=2), 2),
         "dp2-distopt": (dict(use_distributed_optimizer=True), 2),
         "dp1-distopt": (dict(use_distributed_optimizer=True, micro_batch_size=4), 1)}
_RESUME = {"tp2": (dict(), 1), "pp2": (dict(tensor_model_parallel_size=2), 2),
           "dp2-distopt": (dict(use_distributed_optimizer=True, micro_batch_size=4), 1),
           "dp1-distopt": (dict(use_distributed_optimizer=True, tensor_model_parallel_size=2,
                                micro_batch_size=4), 2)}


def _runs(rank, world, model, tmp, table, phase):
    out = {}
    for label, (kw, w) in table.items():
        if w != world:
            continue
        suffix = "" if phase == "full" else "-cut"
        out[label] = _train(model, save=f"{tmp}/{label}{suffix}", save_interval=2, **kw)
    if world == 1 and phase == "resume":
        from megaemb.train import Trainer

        try:  # the optimizer kind is part of the saved state's format
            Trainer(_cfg(model, load=f"{tmp}/tp2", save=""))
            out["switch"] = "no error"
        except ValueError as e:
            out["switch"] = str(e)
    return out


@pytest.mark.timeout(600)
def test_resume_under_another_layout(tiny_models, tmp_path):
    model, tmp = tiny_models["dense"], str(tmp_path)
    full = {**run_distributed(_runs, 2, model, tmp, _RUNS, "full", timeout=300)[0],
            **run_distributed(_runs, 1, model, tmp, _RUNS, "full", timeout=300)[0]}
    for label in _RUNS:
        _cut(f"{tmp}/{label}", f"{tmp}/{label}-cut")
    resumed = {**run_distributed(_runs, 1, model, tmp, _RESUME, "resume", timeout=300)[0],
               **run_distributed(_runs, 2, model, tmp, _RESUME, "resume", timeout=300)[0]}
    for label in _RUNS:
        assert [s for s, _ in resumed[label]] == [3, 4], (label, resumed[label])
        diff = max(abs(a - b) for (_, a), (_, b) in zip(full[label][2:], resumed[label]))
        assert diff <= TOL * max(1.0, abs(full[label][3][1])), (label, full[label], resumed[label])
    assert resumed["switch"] == "no error"  # tp2 (plain Adam, TP=2) loads at TP=1 with plain Adam


def _switch_optimizer(rank, world, model, tmp):
    from megaemb.train import Trainer

    try:
        Trainer(_cfg(model, load=tmp, use_distributed_optimizer=True))
    except ValueError as e:
        return str(e)
    return "no error"


@pytest.mark.timeout(300)
def test_resume_refuses_another_optimizer_kind(tiny_models, tmp_path):
    ckpt = str(tmp_path / "plain")
    run_distributed(_runs, 1, tiny_models["dense"], str(tmp_path),
                    {"plain": (dict(train_iters=2), 1)}, "full", timeout=200)
    msg = run_distributed(_switch_optimizer, 1, tiny_models["dense"], ckpt, timeout=200)[0]
    assert "saved with --use_distributed_optimizer false" in msg and "--finetune true" in msg, msg


# ------------------------------------------------------------------------------ --save reuse

def _save_reuse(rank, world, model, tmp):
    from megaemb.train import Trainer, run_sft

    save = f"{tmp}/run"
    out = {"first": run_sft(_cfg(model, train_iters=2, save=save, save_interval=2))["losses"]}
    hf_mtime = os.path.getmtime(f"{save}/hf_model/config.json")
    again = run_sft(_cfg(model, train_iters=2, save=save, save_interval=2))
    out["again"] = (again["losses"], again["finished_before"],
                    os.path.getmtime(f"{save}/hf_model/config.json") == hf_mtime)
    more = Trainer(_cfg(model, train_iters=3, save=save))
    out["more"] = more.run()["losses"]
    out["decay_steps"] = more.scheduler.lr_decay_steps  # the schedule spans the new length
    out["tracker"] = open(f"{save}/latest_checkpointed_iteration.txt").read()
    for name, kw in [("finetune", dict(load=save, finetune=True)), ("other", dict(load=f"{tmp}/other"))]:
        if name == "other":
            shutil.copytree(save, f"{tmp}/other")
        try:
            Trainer(_cfg(model, save=save, **kw))
            out[name] = "no error"
        except FileExistsError as e:
            out[name] = str(e)
    # inside a Slurm allocation of 2 nodes: the export child must not become a 2-node job
    os.environ.update(SLURM_NNODES="2", SLURM_NODEID="0", SLURM_JOB_NODELIST="node[1-2]",
                      SLURM_PROCID="0", NNODES="2", NODE_RANK="0")
    try:
        run_sft(_cfg(model, train_iters=1, save=f"{tmp}/slurm"))
    finally:
        for k in ("SLURM_NNODES", "SLURM_NODEID", "SLURM_JOB_NODELIST", "SLURM_PROCID", "NNODES", "NODE_RANK"):
            os.environ.pop(k)
    out["slurm_export"] = os.path.isfile(f"{tmp}/slurm/hf_model/model.safetensors")
    return out


@pytest.mark.timeout(420)
def test_save_dir_with_a_run_resumes_and_is_never_overwritten(tiny_models, tmp_path):
    out = run_distributed(_save_reuse, 1, tiny_models["dense"], str(tmp_path), timeout=360)[0]
    assert [s for s, _ in out["first"]] == [1, 2], out
    assert out["again"] == ([], True, True), out  # nothing trained, hf_model untouched
    assert [s for s, _ in out["more"]] == [3] and out["decay_steps"] == 3 and out["tracker"] == "3", out
    for name in ("finetune", "other"):
        assert "already holds a run (iteration 3)" in out[name], out
    assert out["slurm_export"], out


# ------------------------------------------------------------------------------ shipped configs

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
OVERRIDES = ["--dataset", f"{DATA}#16", "--tensor_model_parallel_size", "1",
             "--pipeline_model_parallel_size", "1", "--expert_model_parallel_size", "1",
             "--sequence_parallel", "false", "--micro_batch_size", "2", "--global_batch_size", "4",
             "--train_iters", "1", "--num_train_epochs", "0", "--max_length", "32",
             "--eval_interval", "0", "--save_interval", "0", "--val_dataset", f"{DATA}#8"]


def _configs_one_step(rank, world, models):
    from megaemb.cli import build_parser, sft_config
    from megaemb.train import Trainer

    out = {}
    for path in CONFIGS:
        name = os.path.basename(path)  # a reranker's config: a tied model scores with its embedding
        model = models["moe"] if "moe" in name else models["tied"] if "reranker" in name else models["dense"]
        prompt = ["--max_length", "128"] if "reranker" in name else []  # the template takes 72
        cfg = sft_config(build_parser().parse_args(["sft", "--config", path, "--model", model,
                                                    *OVERRIDES, *prompt]))
        trainer = Trainer(cfg)
        model = trainer.module.config  # what megatron was given, not only what was asked
        out[os.path.basename(path)] = (trainer.run()["losses"], model.bf16, model.recompute_granularity,
                                       model.recompute_method, model.recompute_num_layers)
    return out


@pytest.mark.timeout(600)
def test_every_shipped_config_trains_one_step(tiny_models):
    out = run_distributed(_configs_one_step, 1, tiny_models, timeout=540)[0]
    assert sorted(out) == sorted(os.path.basename(p) for p in CONFIGS)
    for name, (losses, *_) in out.items():
        assert len(losses) == 1 and losses[0][1] == losses[0][1] and losses[0][1] > 0, (name, losses)
    # bf16 + recompute of the first 32 layers of each stage (all of the tiny model's) really ran
    assert out["qwen3-moe-embedder.yaml"][1:] == (True, "full", "block", 32)
    assert out["qwen3-embedding-0.6B.yaml"][1:] == (True, None, None, None)  # no recompute


@pytest.mark.timeout(600)
def test_readme_8b_command_runs(tiny_models, tmp_path):
    """The README's 8B line (``megaemb sft --config configs/qwen3-embedding-8B.yaml --model ...
    --save ...``) through the real CLI on 2 processes, TP=2 as the config asks for SP."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", NPROC_PER_NODE="2")
    for k in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT"):
        env.pop(k, None)
    over = [a for a in OVERRIDES]
    over[over.index("--tensor_model_parallel_size") + 1] = "2"
    over[over.index("--sequence_parallel") + 1] = "true"
    r = subprocess.run([sys.executable, "-m", "megaemb.cli", "sft", "--config",
                        os.path.join(ROOT, "configs", "qwen3-embedding-8B.yaml"),
                        "--model", tiny_models["dense"], *over, "--save", str(tmp_path / "out")],
                       capture_output=True, text=True, env=env, timeout=540, cwd=ROOT)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert os.path.isfile(tmp_path / "out" / "hf_model" / "config.json")
