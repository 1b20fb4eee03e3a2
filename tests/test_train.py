"""``megaemb sft`` end to end under real gloo groups: every parallel layout trains the same
model (per-step losses after optimizer updates match a TP=PP=DP=1 run), resuming from a
checkpoint continues the uninterrupted run exactly, a crash mid-save leaves the previous
checkpoint loadable, and bad data fails with one line (or is skipped) through the CLI.

Notes on the references:

* TP / TP+SP / PP keep DP=1, so each step is 2 micro-batches of 2 examples, exactly as in
  the world-1 reference with ``micro_batch_size=2``.
* DP=2 (and EP=2, which leaves DP=2 on two ranks) runs one micro-batch of 2 per rank and
  the InfoNCE in-batch candidates are gathered over the DP group, i.e. all 4 examples of
  the step. Its world-1 twin is therefore ``micro_batch_size=4`` (one micro-batch of the
  same 4 examples), not ``micro_batch_size=2`` (two micro-batches that each see 2).
"""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from distributed import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "demo", "data", "train.jsonl")
TOL = 1e-5


def _cfg(model, **kw):
    from megaemb.config import SFTConfig

    base = dict(model=model, dataset=[f"{DATA}#64"], max_length=32, micro_batch_size=2,
                global_batch_size=4, train_iters=3, lr=1e-4, infonce_temperature=0.05,
                clip_grad=1e9, log_interval=1, seed=42)
    base.update(kw)
    return SFTConfig(**base)


def _train(cfg) -> list:
    from megaemb.train import Trainer

    return Trainer(cfg).run()["losses"]


def _steps(cfg) -> list:
    """[(step, loss, grad_norm)] of each step (grad norm before clipping, over all ranks)."""
    from megaemb.train import Trainer

    trainer, out = Trainer(cfg), []
    for trainer.step in range(cfg.train_iters):
        stats = trainer.train_step()
        out.append((trainer.step + 1, stats["loss"], stats["grad_norm"]))
    return out


def _close(a, b, tol=TOL) -> float:
    """Max difference between two [(step, value, ...)] lists (relative where values exceed 1)."""
    assert [r[0] for r in a] == [r[0] for r in b], (a, b)
    return max(abs(x - y) / max(1.0, abs(y)) for ra, rb in zip(a, b) for x, y in zip(ra[1:], rb[1:]))


# ------------------------------------------------------------------------------ layouts

def _references(rank, world, models):
    return {
        "dense/mbs2": _steps(_cfg(models["dense"])),
        "dense/mbs4": _steps(_cfg(models["dense"], micro_batch_size=4)),
        "moe/mbs4": _steps(_cfg(models["moe"], micro_batch_size=4)),
    }


def _layout_group(rank, world, models):
    out = {}
    for label, name, kw in _LAYOUTS:
        out[label] = _steps(_cfg(models[name], **kw))
    return out


_BASE_LAYOUTS = [  # label, model, SFTConfig overrides
    ("dense/tp2", "dense", dict(tensor_model_parallel_size=2)),
    ("dense/tp2-sp", "dense", dict(tensor_model_parallel_size=2, sequence_parallel=True)),
    ("dense/pp2", "dense", dict(pipeline_model_parallel_size=2)),
    ("dense/dp2", "dense", dict()),
    ("dense/dp2-distopt", "dense", dict(use_distributed_optimizer=True)),
    # CUDA's default: bucketed gradient reduce-scatter overlapping the backward pass
    ("dense/dp2-distopt-overlap", "dense", dict(use_distributed_optimizer=True, overlap_grad_reduce=True)),
    ("moe/ep2", "moe", dict(expert_model_parallel_size=2)),
]
# every layout again with packed [1, T] micro-batches, against the same padded reference
_LAYOUTS = _BASE_LAYOUTS + [(label + "/packed", name, dict(kw, packing=True))
                            for label, name, kw in _BASE_LAYOUTS if "distopt" not in label]
_BASE_REFERENCE = {"dense/tp2": "dense/mbs2", "dense/tp2-sp": "dense/mbs2", "dense/pp2": "dense/mbs2",
                   "dense/dp2": "dense/mbs4", "dense/dp2-distopt": "dense/mbs4", "dense/dp2-distopt-overlap": "dense/mbs4",
                   "moe/ep2": "moe/mbs4"}
_REFERENCE = {label: _BASE_REFERENCE[label.removesuffix("/packed")] for label, _, _ in _LAYOUTS}


@pytest.mark.timeout(600)
def test_layouts_train_identically(tiny_models):
    """Per-step losses and gradient norms of every layout, padded and packed, equal the
    world-1 padded run within 1e-5 (after optimizer updates: equal losses test the updates)."""
    refs = run_distributed(_references, 1, tiny_models, timeout=300)[0]
    got = run_distributed(_layout_group, 2, tiny_models, timeout=540)[0]  # rank 0 logs
    diffs = {}
    for label, ref_key in _REFERENCE.items():
        ref = refs[ref_key]
        assert len(ref) == 3 and all(l == l for _, l, _ in ref), ref  # 3 finite steps
        diffs[label] = _close(got[label], ref)
    print("max loss / grad-norm differences:", {k: f"{v:.2e}" for k, v in diffs.items()})
    # the model does learn: losses move between steps (so equal losses test the updates)
    assert abs(refs["dense/mbs2"][0][1] - refs["dense/mbs2"][2][1]) > 1e-4
    bad = {k: v for k, v in diffs.items() if v > TOL}
    assert not bad, (bad, got, refs)


# ------------------------------------------------------------------------------ resume

def _resume_run(rank, world, model, full_dir, resume_dir):
    """Uninterrupted 4 steps (saves at 2 and 4); then resume from a copy cut back to step 2
    (as if killed after the step-2 save, with a half-written iter_0000004.tmp) to step 4."""
    from megaemb import checkpoint

    full = _train(_cfg(model, train_iters=4, save=full_dir, save_interval=2))
    shutil.copytree(full_dir, resume_dir)
    shutil.rmtree(os.path.join(resume_dir, "iter_0000004"))
    os.makedirs(os.path.join(resume_dir, "iter_0000004.tmp"))
    with open(os.path.join(resume_dir, "iter_0000004.tmp", "junk.distcp"), "wb") as f:
        f.write(b"\x00garbage" * 100)
    checkpoint.write_atomic(os.path.join(resume_dir, checkpoint.TRACKER), "2")
    assert checkpoint.latest_iteration(resume_dir) == 2
    resumed = _train(_cfg(model, train_iters=4, save=resume_dir, load=resume_dir, save_interval=2))
    finetuned = _train(_cfg(model, train_iters=1, load=full_dir, finetune=True))
    return full, resumed, finetuned


@pytest.mark.timeout(300)
def test_resume_continues_exactly(tiny_models, tmp_path):
    full, resumed, finetuned = run_distributed(_resume_run, 1, tiny_models["dense"],
                                               str(tmp_path / "full"), str(tmp_path / "resumed"),
                                               timeout=240)[0]
    assert [s for s, _ in full] == [1, 2, 3, 4]
    assert [s for s, _ in resumed] == [3, 4], resumed
    diff = _close(resumed, full[2:], tol=1e-6)
    print(f"resume max loss difference: {diff:.2e}")
    assert diff <= 1e-6, (full, resumed)
    # the resumed save replaced the junk .tmp with a complete iteration 4
    names = sorted(os.listdir(tmp_path / "resumed"))
    assert "iter_0000004" in names and "iter_0000004.tmp" not in names, names
    # --finetune: the step-4 weights, but a fresh run (step 1, new optimizer): the first batch
    # now scores with trained weights, so its loss is not the untrained step-1 loss
    assert [s for s, _ in finetuned] == [1]
    assert abs(finetuned[0][1] - full[0][1]) > 1e-3, (finetuned, full)


# ------------------------------------------------------------------------------ interrupted save

def _load_after_crash(rank, world, ckpt):
    import torch

    from megaemb import checkpoint
    from megaemb.config import ParallelConfig
    from megaemb.convert.load import load_model
    from megaemb.parallel import init_parallel

    it = checkpoint.latest_iteration(ckpt)
    init_parallel(ParallelConfig())
    lm = load_model(ckpt, ParallelConfig())
    params = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    return it, sum(float(p.abs().sum()) for p in params.values()), all(
        bool(torch.isfinite(p).all()) for p in params.values())


def _save_two_steps(rank, world, model, ckpt):
    return _train(_cfg(model, train_iters=2, save=ckpt, save_interval=2))


@pytest.mark.timeout(300)
def test_crash_mid_save_keeps_previous_checkpoint(tiny_models, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    run_distributed(_save_two_steps, 1, tiny_models["dense"], ckpt, timeout=240)
    # a save of iteration 4 that died half way: the .tmp dir exists, the tracker is untouched
    tmp = os.path.join(ckpt, "iter_0000004.tmp")
    os.makedirs(tmp)
    with open(os.path.join(tmp, "__0_0.distcp"), "wb") as f:
        f.write(os.urandom(4096))
    with open(os.path.join(tmp, "metadata.json"), "w") as f:
        f.write("{not json")
    from megaemb import checkpoint

    assert checkpoint.latest_iteration(ckpt) == 2
    it, total, finite = run_distributed(_load_after_crash, 1, ckpt, timeout=240)[0]
    assert it == 2 and finite and total > 0


# ------------------------------------------------------------------------------ CLI: bad data

def _megaemb(*args, timeout=300, nproc=1):
    env = dict(os.environ, PYTHONWARNINGS="ignore", NPROC_PER_NODE=str(nproc))
    for k in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.run([sys.executable, "-m", "megaemb.cli", *args], capture_output=True,
                          text=True, env=env, timeout=timeout, cwd=ROOT)


def _bad_file(tmp_path):
    rows = open(DATA).read().splitlines()[:8]
    bad = json.loads(rows[4])
    bad["response"] = ""
    rows[4] = json.dumps(bad)
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return str(path)


SFT_ARGS = ["--max_length", "32", "--micro_batch_size", "2", "--global_batch_size", "4",
            "--train_iters", "1", "--lr", "1e-4", "--infonce_temperature", "0.05", "--log_interval", "1"]


@pytest.mark.timeout(300)
def test_bad_row_fails_with_one_line(tiny_models, tmp_path):
    path = _bad_file(tmp_path)
    r = _megaemb("sft", "--model", tiny_models["dense"], "--dataset", path, *SFT_ARGS)
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [l for l in r.stderr.splitlines() if l.startswith("megaemb sft: error:")]
    assert len(lines) == 1, r.stderr[-3000:]
    assert f"{path}:5" in lines[0] and "response" in lines[0], lines[0]


@pytest.mark.timeout(300)
def test_global_batch_larger_than_the_data_is_refused(tiny_models):
    """A step of 4 over 3 examples would hold an example twice (its positive among its own
    negatives, more than an epoch per step): one line, exit 2; #N repeats on purpose."""
    r = _megaemb("sft", "--model", tiny_models["dense"], "--dataset", f"{DATA}#3", *SFT_ARGS)
    assert r.returncode == 2 and "Traceback" not in r.stderr, (r.returncode, r.stderr[-3000:])
    lines = [l for l in r.stderr.splitlines() if l.startswith("megaemb sft: error:")]
    assert lines == ["megaemb sft: error: --global_batch_size 4 is larger than the 3 training groups "
                     "(a query, its positive and negatives): one step would hold examples more "
                     "than once; lower it, or repeat the data on purpose with --dataset PATH#N "
                     "(N examples)"], r.stderr[-3000:]


@pytest.mark.timeout(300)
def test_bad_row_skip_trains(tiny_models, tmp_path):
    path = _bad_file(tmp_path)
    r = _megaemb("sft", "--model", tiny_models["dense"], "--dataset", path, "--bad_rows", "skip",
                 *SFT_ARGS)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "1 skipped" in r.stdout, r.stdout[-3000:]
    assert "step 1: loss" in r.stdout + r.stderr, (r.stdout[-2000:], r.stderr[-2000:])


# ------------------------------------------------------------------------------ real SIGKILL

@pytest.mark.timeout(420)
def test_sigkill_after_save_then_resume(tiny_models, tmp_path):
    """A 2-rank ``megaemb sft`` killed (SIGKILL to the launcher: its ranks die with it) once
    its step-2 save is complete: the same command run again resumes on its own and reaches the
    same step 3-4 losses as an uninterrupted run (printed with 4 decimals by the CLI)."""
    ckpt = tmp_path / "killed"
    args = ["sft", "--model", tiny_models["dense"], "--dataset", f"{DATA}#64", *SFT_ARGS,
            "--clip_grad", "1e9", "--save_interval", "2"]
    args[args.index("--train_iters") + 1] = "4"
    env = dict(os.environ, PYTHONWARNINGS="ignore", NPROC_PER_NODE="2")
    for k in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.Popen([sys.executable, "-m", "megaemb.cli", *args, "--save", str(ckpt)],
                            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tracker = ckpt / "latest_checkpointed_iteration.txt"
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if tracker.is_file() and tracker.read_text().strip() == "2":
                break
            time.sleep(0.05)
        assert proc.poll() is None, "training ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    resumed = _megaemb(*args, "--save", str(ckpt), nproc=2)  # the same command again
    full = _megaemb(*args, "--save", str(tmp_path / "full"), nproc=2)
    assert resumed.returncode == 0 and full.returncode == 0, (resumed.stderr[-3000:], full.stderr[-3000:])
    assert f"resuming from {ckpt} at iteration 2" in resumed.stdout, resumed.stdout[-3000:]

    def losses(r):
        out = {}
        for line in (r.stdout + r.stderr).splitlines():
            if line.startswith("step ") and ": loss " in line:
                step, rest = line[5:].split(": loss ")
                out[int(step)] = float(rest.split()[0])
        return out

    lr, lf = losses(resumed), losses(full)
    assert sorted(lr) == [3, 4] and sorted(lf) == [1, 2, 3, 4], (lr, lf)
    assert all(lr[s] == lf[s] for s in (3, 4)), (lr, lf)


# ------------------------------------------------------------------------------ HF exports

def _train_with_hf_exports(rank, world, model, save):
    from hf_reference import PAD, random_batch, token_lists
    from megaemb.config import ParallelConfig
    from megaemb.convert.load import load_model
    from megaemb.inference import forward_embeddings
    from megaemb.parallel import init_parallel
    from megaemb.train import run_sft

    run_sft(_cfg(model, train_iters=2, save=save, save_interval=1, save_hf=True,
                 tensor_model_parallel_size=2))
    parallel = ParallelConfig(tensor_model_parallel_size=2)
    init_parallel(parallel)
    ids, lengths = random_batch()
    return forward_embeddings(load_model(save, parallel).model, token_lists(ids, lengths), pad_id=PAD)


@pytest.mark.timeout(400)
def test_save_hf_exports_each_save_and_the_end(tiny_models, tmp_path):
    from hf_reference import compare, hf_embeddings, random_batch
    from safetensors.torch import load_file

    save = str(tmp_path / "run")
    trained = run_distributed(_train_with_hf_exports, 2, tiny_models["dense"], save, timeout=360)[0]
    weights = {d: load_file(os.path.join(save, d, "model.safetensors"))
               for d in ("iter_0000001_hf", "iter_0000002_hf", "hf_model")}
    key = "layers.0.mlp.down_proj.weight"
    assert torch.equal(weights["iter_0000002_hf"][key], weights["hf_model"][key])
    assert not torch.equal(weights["iter_0000001_hf"][key], weights["hf_model"][key])
    # the exported HF model embeds like the trained MCore checkpoint
    stats = compare(hf_embeddings(os.path.join(save, "hf_model"), *random_batch()), trained)
    assert stats["cos_min"] >= 0.99999, stats
    with open(os.path.join(save, "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["iteration"] == 2 and isinstance(metrics["last_step_loss"], float), metrics
    assert metrics["hf_model"] == os.path.join(save, "hf_model")


# ------------------------------------------------------------------------------ pair losses

def _pair_loss_run(rank, world, model, data, loss_type):
    from megaemb.config import SFTConfig
    from megaemb.train import Trainer

    cfg = SFTConfig(model=model, dataset=[data], val_dataset=[data], loss_type=loss_type,
                    max_length=32, micro_batch_size=4, global_batch_size=4, train_iters=3, lr=1e-4,
                    mrl_dims=[16, 64], log_interval=1)
    history = Trainer(cfg).run()
    return history["losses"], history["eval_after"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("loss_type", ["cosine_similarity", "contrastive", "online_contrastive"])
def test_labelled_pair_losses_train(tiny_models, tmp_path, loss_type):
    rows = [{"query": f"package {i}", "response": f"description of package {i % 3}",
             "label": float(i % 2) if loss_type == "cosine_similarity" else i % 2} for i in range(8)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    losses, metrics = run_distributed(_pair_loss_run, 1, tiny_models["dense"], str(data), loss_type,
                                      timeout=240)[0]
    assert [s for s, _ in losses] == [1, 2, 3]
    assert all(math.isfinite(v) and v > 0 for _, v in losses), losses
    assert {"spearman", "pearson", "mean_pos", "mean_neg"} <= set(metrics), metrics
