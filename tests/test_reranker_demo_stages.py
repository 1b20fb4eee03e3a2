"""The reranker demo's two data stages: LM pretraining over a restricted vocabulary
(demo/pretrain_reranker_lm.py) and other rows' positives as negatives (run_reranker_demo.py)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "demo"))
TRAIN = os.path.join(ROOT, "demo", "data", "train.jsonl")
# what the demos' megaemb steps see: no rendezvous left in os.environ by an in-process test
ENV = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}


@pytest.mark.timeout(120)
def test_restricted_vocabulary_is_the_full_models_and_scatters_back(tmp_path):
    """``restrict``: on kept tokens the small model's logits are the full model's kept columns;
    ``scatter_back`` of a trained small model writes exactly its K rows and other weights and
    leaves the other V - K rows as they were."""
    from transformers import AutoModelForCausalLM

    from megaemb.tiny import make_tiny_checkpoint
    from pretrain_reranker_lm import restrict, scatter_back

    model = AutoModelForCausalLM.from_pretrained(make_tiny_checkpoint(str(tmp_path / "m"), causal_lm=True,
                                                                      with_tokenizer=False)).eval()
    kept = torch.tensor(sorted({151643, 9693, 2152, *range(1000, 1300)}))
    to_small = torch.full((model.config.vocab_size,), len(kept))
    to_small[kept] = torch.arange(len(kept))
    ids = kept[torch.randint(len(kept), (2, 9), generator=torch.Generator().manual_seed(0))]
    small = restrict(model, kept).eval()
    assert small.config.vocab_size == len(kept) + 1 and small.config.pad_token_id == int((kept == 151643).nonzero())
    with torch.no_grad():
        torch.testing.assert_close(small(to_small[ids]).logits[..., :len(kept)], model(ids).logits[..., kept],
                                   rtol=0, atol=1e-5)
        for p in small.parameters():  # "train" it
            p.add_(torch.randn_like(p) * 0.05)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scatter_back(model, small, kept)
    after, trained = model.state_dict(), small.state_dict()
    other = torch.ones(model.config.vocab_size, dtype=torch.bool)
    other[kept] = False
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(after[name][kept], trained[name][:len(kept)])
        assert torch.equal(after[name][other], before[name][other])
    assert all(torch.equal(after[k], trained[k]) for k in after if "embed_tokens" not in k and "lm_head" not in k)
    with torch.no_grad():
        torch.testing.assert_close(small(to_small[ids]).logits[..., :len(kept)], model(ids).logits[..., kept],
                                   rtol=0, atol=1e-5)


@pytest.mark.timeout(60)
def test_lm_texts_and_other_positives_of_the_demo_slice(tmp_path):
    """The demo slice gives 2,000 pair texts + 5,047 distinct other documents; each row gains
    two positives of other rows, every positive is added exactly twice, nothing else changes."""
    from pretrain_reranker_lm import lm_texts
    from run_reranker_demo import with_other_positives

    texts = lm_texts(TRAIN)
    assert len(texts) == len(set(texts)) == 7047
    assert sum(t.startswith("<Query>: ") for t in texts) == 2000
    rows = [json.loads(l) for l in open(TRAIN)]
    out = [json.loads(l) for l in open(with_other_positives(TRAIN, str(tmp_path / "t.jsonl")))]
    assert sorted(r["query"] for r in out) == sorted(r["query"] for r in rows)
    by_query = {r["query"]: r for r in rows}
    added = Counter()
    for r in out:
        src = by_query[r["query"]]
        assert r["response"] == src["response"] and r["rejected_response"][:3] == src["rejected_response"]
        assert len(r["rejected_response"]) == 5 and r["response"] not in r["rejected_response"][3:]
        added.update(r["rejected_response"][3:])
    assert set(added) == {r["response"] for r in rows} and set(added.values()) == {2}
    dup = tmp_path / "dup.jsonl"
    dup.write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[0]) + "\n")
    with pytest.raises(ValueError, match="positives are not distinct"):
        with_other_positives(str(dup), str(tmp_path / "x.jsonl"))


@pytest.mark.timeout(180)
def test_demo_scripts_refuse_bad_arguments_in_one_line(tmp_path):
    """Each mistake is one ``error:`` line and exit code 2, before any training."""
    from megaemb.tiny import make_tiny_checkpoint

    model = make_tiny_checkpoint(str(tmp_path / "m"), causal_lm=True, with_tokenizer=False)
    embedder = make_tiny_checkpoint(str(tmp_path / "e"), with_tokenizer=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "a", "response": "b"}\n{"query": 3}\n')
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("mine")
    cases = [
        (["demo/pretrain_reranker_lm.py", str(tmp_path / "nope"), str(tmp_path / "o")], "no config.json"),
        (["demo/pretrain_reranker_lm.py", model, str(tmp_path / "o"), "--steps", "0"], "--steps must be at least 1"),
        (["demo/pretrain_reranker_lm.py", model, str(full)], "exists and is not an empty directory"),
        (["demo/pretrain_reranker_lm.py", model, str(tmp_path / "o"), "--data", str(bad)],
         f"{bad}:2: field 'query'"),
        (["demo/run_reranker_demo.py", "--retriever", str(tmp_path / "nope")], "no such directory"),
        (["demo/run_reranker_demo.py", "--train_iters", "0"], "--train_iters must be at least 1"),
    ]
    mine = tmp_path / "mine"  # a user's folder: never emptied
    mine.mkdir()
    (mine / "run").mkdir()
    (mine / "run" / "notes.txt").write_text("mine")
    inside = tmp_path / "inside"  # the retriever inside --out
    shutil.copytree(model, inside / "run" / "retriever")
    (inside / ".megaemb-reranker-demo").write_text("")
    demo = ["demo/run_reranker_demo.py", "--retriever", model]
    cases += [(demo + ["--out", str(mine)], f"--out {mine} is not empty and not an earlier run of this demo"),
              (demo + ["--out", str(bad)], "not a directory"),
              (demo + ["--out", ""], "--out: give a folder"),
              (["demo/run_reranker_demo.py", "--retriever", str(inside / "run" / "retriever"), "--out",
                str(inside)], "lies inside --out"),
              (demo + ["--nproc", "3"], "invalid choice: 3"),
              (demo + ["--queries", "1000"], "--queries 1000: the dev slice has 300"),
              (["demo/pretrain_reranker_lm.py", model, str(tmp_path / "o"), "--lr", "-1"], "--lr must be a positive"),
              (["demo/pretrain_reranker_lm.py", model, str(tmp_path / "o"), "--lr", "inf"], "--lr must be a positive"),
              (["demo/pretrain_reranker_lm.py", embedder, str(tmp_path / "o")], "Qwen3Model, not a *ForCausalLM")]
    from megaemb.outputs import lock_path, owned

    busy = tmp_path / "busy"  # a demo writing there now: the lock of this (live) process
    cases.append((["demo/run_reranker_demo.py", "--retriever", model, "--out", str(busy)],
                  f"{busy}: in use by"))
    with owned(str(busy), False, str(busy), "test"):
        assert os.path.isfile(lock_path(str(busy), False))
        for argv, message in cases:
            proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120,
                                  env=ENV)
            last = proc.stderr.strip().splitlines()[-1]
            assert proc.returncode == 2 and "error:" in last and message in last, (argv, proc.stderr[-2000:])
    # a failed megaemb step: its own error line, then one line of the demo's, no traceback
    proc = subprocess.run([sys.executable, demo[0], "--retriever", model, "--out", str(tmp_path / "r"),
                           "--nproc", "1"], cwd=ROOT, capture_output=True, text=True, timeout=120, env=ENV)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines[-2].startswith("megaemb eval: error: --retriever") and lines[-1] == (
        "run_reranker_demo.py: error: `megaemb eval` failed (exit 2); its error is above"), lines[-2:]
    assert (full / "x").read_text() == "mine" and not (tmp_path / "o").exists() and not busy.exists()
    assert (mine / "run" / "notes.txt").read_text() == "mine"
    assert (inside / "run" / "retriever" / "config.json").is_file() and not (tmp_path / "demo_out").exists()


@pytest.mark.timeout(240)
def test_a_killed_demo_leaves_no_megaemb_process_and_can_be_rerun(tmp_path):
    """SIGTERM to the demo alone (not its process group) during sft: the megaemb job dies
    with it (parent-death signal), so a rerun into the same --out never meets a live writer."""
    import psutil

    from megaemb.tiny import make_tiny_checkpoint

    embedder = make_tiny_checkpoint(str(tmp_path / "e"))
    out = tmp_path / "demo"
    cmd = [sys.executable, "demo/run_reranker_demo.py", "--retriever", embedder, "--out", str(out),
           "--pretrain_steps", "2", "--train_iters", "100000", "--queries", "4", "--nproc", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**ENV, "PYTHONPATH": ROOT})
    for line in proc.stdout:
        if line.startswith("$ NPROC_PER_NODE=1 megaemb sft"):
            break
    time.sleep(15)  # the sft job is training
    jobs = [p for p in psutil.Process(proc.pid).children(recursive=True)]
    assert any("sft" in p.cmdline() for p in jobs), [p.cmdline() for p in jobs]
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    gone, alive = psutil.wait_procs(jobs, timeout=60)
    for p in alive:  # orphans: clean up, then fail
        p.kill()
    assert not alive, [p.cmdline() for p in alive]
    rerun = subprocess.run(cmd[:-8] + ["--pretrain_steps", "1", "--train_iters", "1", "--queries", "4",
                                       "--nproc", "1"], cwd=ROOT, capture_output=True, text=True, timeout=150,
                           env={**ENV, "PYTHONPATH": ROOT})
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "taking over the lock" in rerun.stderr and (out / "eval-trained.json").is_file()
