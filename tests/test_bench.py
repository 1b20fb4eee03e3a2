"""bench/: the throughput benchmark in ``--tiny`` mode and the smoke chain, both on CPU."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# CPU even where a GPU is present: the tiny modes are fp32 checks, and MFU / peak memory are null
ENV = dict(os.environ, PYTHONPATH=ROOT, PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="")


@pytest.mark.timeout(150)
def test_throughput_tiny_reports_both_sides_and_they_agree(tmp_path):
    out = tmp_path / "result.json"
    r = subprocess.run([sys.executable, "bench/throughput.py", "--tiny", "--profile", "--output", str(out)],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=140)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["dtype"] == "fp32" and report["megaemb_packing"]
    for name in ("dense", "mix"):
        w = report[name]
        assert w == report["by_size"]["tiny"][name]
        for side in ("megaemb", "baseline"):
            assert w[f"{side}_tokens_per_s"] > 0 and w[f"{side}_groups_per_s"] > 0
            assert w[f"{side}_mfu"] is None and w[f"{side}_peak_gib"] is None  # CPU: unknown
        assert w["speedup"] == pytest.approx(w["megaemb_tokens_per_s"] / w["baseline_tokens_per_s"])
        assert w["mfu"] is None and w["peak_gib"] is None
        assert w["timed_steps"] == 2 and w["real_tokens_per_step"] > 0 and w["train_flops_per_step"] > 0
        # the same texts through both models (fp32): the comparison is of equals
        assert 1 - w["max_cos_distance"] >= 0.9999
        for side in ("megaemb", "baseline"):  # --profile: top operators by self time, largest first
            ops = w[f"{side}_profile"]
            assert 0 < len(ops) <= 15 and sum(o["share"] for o in ops) <= 1 + 1e-9
            assert [o["self_ms"] for o in ops] == sorted((o["self_ms"] for o in ops), reverse=True)
            assert any(o["name"] in ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear") for o in ops), ops
    assert report["dense"]["baseline_padding"] == 0 and report["dense"]["texts_per_step"] == 4
    mix = report["mix"]
    assert mix["texts_per_step"] == 2 * 5  # 2 groups of query, positive, 3 negatives
    assert 0 <= mix["megaemb_padding"] < mix["baseline_padding"]  # packing drops most padding
    assert "| tiny | mix |" in r.stdout and "tiny mix megaemb: top operators by self time" in r.stdout


@pytest.mark.timeout(150)
def test_throughput_tiny_reranker_scores_agree_and_count_the_head(tmp_path, monkeypatch):
    """``--task generative_reranker``: Qwen3-Reranker prompts of debian-desc groups, megaemb's
    yes/no head vs ``Qwen3ForCausalLM`` with ``logits_to_keep=1``: the same scores (fp32), and
    the MFU's FLOPs hold the head's two rows per prompt."""
    from megaemb.model.flops import train_flops
    from megaemb.shape import Qwen3Shape
    from megaemb.tiny import tiny_config

    out = tmp_path / "result.json"
    flags = ["--tiny", "--task", "generative_reranker", "--workloads", "mix", "--output", str(out)]
    r = subprocess.run([sys.executable, "bench/throughput.py", *flags], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=140)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(out.read_text())
    w = report["mix"]
    assert report["task"] == "generative_reranker" and w["texts_per_step"] == 2 * 4  # (q, p), 3 (q, n)
    assert w["max_score_diff"] <= 1e-5 * max(1.0, w["max_abs_score"]) and w["max_abs_score"] > 0
    assert w["megaemb_tokens_per_s"] > 0 and w["baseline_tokens_per_s"] > 0
    assert 0 <= w["megaemb_padding"] <= w["baseline_padding"]
    # the same steps rebuilt here: FLOPs per timed step = the model's + 2 rows x 2h x 3 per prompt
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    import throughput

    args = throughput.parse_args(flags)
    timed = throughput.build_workloads(args)[0].steps[args.warmup:]
    shape = Qwen3Shape.from_hf(tiny_config().to_dict())
    assert [s.lengths for s in timed][0] != [s.lengths for s in timed][1]
    for rows, ok in ((2, True), (0, False)):
        expect = sum(train_flops(shape, s.lengths, rows) for s in timed) / len(timed)
        assert (w["train_flops_per_step"] == pytest.approx(expect, rel=1e-12)) is ok


@pytest.mark.timeout(240)
def test_gpu_smoke_runs_on_cpu(tmp_path):
    env = dict(ENV, SMOKE_DEVICE="cpu", SMOKE_OUT=str(tmp_path / "smoke"), PYTHON=sys.executable)
    r = subprocess.run(["bash", "bench/gpu_smoke.sh"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=230)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    lines = r.stdout.strip().splitlines()
    assert lines[-1].startswith("gpu_smoke: ok"), lines[-5:]
    assert any(line.startswith("smoke_check: megaemb embed vs transformers (fp32)") for line in lines)


@pytest.mark.timeout(60)
def test_out_of_memory_is_recorded_not_fatal(monkeypatch):
    import torch

    from megaemb.data.batching import pad_batch
    from megaemb.shape import Qwen3Shape
    from megaemb.tiny import tiny_config

    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    import throughput
    import workloads

    class OutOfMemory:
        def prepare(self, seqs, pad_id):
            return pad_batch(seqs, pad_id)

        def embed(self, batch):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")

        def zero_grad(self):
            pass

    def cannot_load():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    work = workloads.dense(3, texts=4, length=8)
    shape = Qwen3Shape.from_hf(tiny_config().to_dict())
    baseline = {"seconds": 2.0, "computed_tokens": 64, "peak_gib": None, "shapes": 1,
                "first": torch.eye(4)}
    r = throughput.summarize(work, 1, shape, {"baseline": baseline,
                                              "megaemb": throughput.measure(OutOfMemory(), work, 1)})
    assert r["megaemb_error"] == "out of memory" and r["megaemb_tokens_per_s"] is None
    assert r["speedup"] is None and r["max_cos_distance"] is None and r["peak_gib"] is None
    assert r["baseline_tokens_per_s"] == 2 * 4 * 8 / 2.0 and r["baseline_padding"] == 0
    assert throughput.run_side("megaemb", cannot_load, [work], 1) == {
        "dense": {"error": "out of memory (loading)"}}
    table = throughput.markdown_table({"by_size": {"0.6B": {"dense": r}}})
    assert "| 0.6B | dense | out of memory | 32 |" in table


@pytest.mark.timeout(300)
def test_global_negatives_bench_runs_both_sides(tmp_path):
    """bench/global_negatives.py on the tiny model: both sides train and are evaluated, the
    overhead is computed, and the max-batch probe stops at its cap."""
    out = tmp_path / "negatives.json"
    r = subprocess.run([sys.executable, "bench/global_negatives.py", "--size", "tiny", "--steps", "4",
                        "--global_batch_size", "8", "--micro_batch_size", "2", "--max_length", "32",
                        "--eval_limit", "50", "--max_batch", "--max_batch_cap", "16", "--output", str(out)],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=290)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(out.read_text())
    for side in ("micro_batch_negatives", "global_negatives"):
        run = report[side]
        assert "failed" not in run and run["seconds_per_step"] > 0, run
        assert 0 <= run["recall@10_before"] <= 1 and 0 <= run["recall@10_after"] <= 1
    assert report["micro_batch_negatives"]["recall@10_before"] == report["global_negatives"]["recall@10_before"]
    assert isinstance(report["time_overhead"], float)
    assert report["max_global_batch"] == {"micro_batch_negatives": 16, "global_negatives": 16}


@pytest.mark.slow  # 370-470 s on 2 busy shared CPU cores: smoke, benchmarks, negatives, flex, LoRA-TE
@pytest.mark.timeout(900)
def test_gpu_check_dry_run_runs_the_whole_plan(tmp_path):
    """``bench/gpu_check.sh --dry-run``: every check of the GPU plan runs on CPU (LoRA under
    TE with ``tests/te_fakes.py``), the JSON holds their numbers, and the exit code is 0."""
    out = tmp_path / "check.json"
    r = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run", "--output", str(out)], cwd=ROOT,
                       env=dict(ENV, PYTHON=sys.executable), capture_output=True, text=True, timeout=880)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    report = json.loads(out.read_text())
    checks = report["checks"]
    assert report["ok"] and report["dry_run"] and list(checks) == [
        "versions", "spec_parity", "flex", "lora_te", "gpu_smoke", "throughput",
        "throughput_recompute", "throughput_reranker", "global_negatives"]
    assert all(checks[k]["ok"] for k in checks)
    assert checks["lora_te"]["fp32_packed_grad_max_rel_diff"] <= 1e-3
    assert checks["flex"]["fp32_max_out_diff"] <= 1e-4 and checks["flex"]["graphs_added"] <= 2
    assert checks["spec_parity"]["fp32_sdpa_packed"] <= 1e-4
    assert checks["spec_parity"]["bf16_sdpa_packed"] >= 0.999
    assert checks["throughput_recompute"]["dense_megaemb_embedding_backward_ms_per_step"] > 0
    assert checks["throughput_reranker"]["mix_max_score_diff"] <= 1e-5
    assert r.stdout.strip().splitlines()[-1].startswith("gpu_check: ok")


def _check_flex(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    import check_flex

    return check_flex


@pytest.mark.timeout(240)  # ~40 s on 2 shared CPU cores: two inductor-CPU compiles
def test_check_flex_dry_run_measures_and_passes(monkeypatch):
    """``bench/check_flex.py`` on CPU: megaemb's compiled FlexAttention (forward: inductor on
    CPU does not compile its backward) equals SDPA math under the dense document rule, compiles
    at most one graph per grad mode over a train + eval mix of lengths, and builds the 32k
    block mask far below a dense mask's bytes."""
    r = _check_flex(monkeypatch).run(dry_run=True)
    assert r["ok"] is True and r["device"] == "cpu" and r["backward"] is False
    assert 0 <= r["fp32_max_out_diff"] <= 1e-4
    assert r["fp32_max_grad_diff_q"] is None  # forward only on CPU
    assert 0 <= r["graphs_added"] <= r["graphs_expected_max"] == 2
    assert r["flex_graphs"] <= r["flex_graphs_bound"]
    assert 0 < r["mask_build_bytes"] <= r["mask_build_bound_bytes"] == r["dense_mask_bytes"] // 64
    assert r["mask_T"] == 32768 and all(t % 128 for t in r["lengths"])


@pytest.mark.timeout(120)
def test_check_flex_fails_on_wrong_attention(monkeypatch):
    """Attention that ignores document boundaries (causal over the whole pack) in place of
    megaemb's FlexAttention: ``ok`` is false and the difference is reported."""
    import torch.nn.functional as F

    from megaemb.model import attention

    check_flex = _check_flex(monkeypatch)

    def causal_across_documents(q, k, v, block_mask=None, scale=None, enable_gqa=False):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=enable_gqa)

    monkeypatch.setattr(attention, "_flex_attention", causal_across_documents)
    r = check_flex.run(dry_run=True)
    assert r["ok"] is False and r["fp32_max_out_diff"] > 1e-2
    assert r["graphs_added"] == 0 and r["mask_build_bytes"] <= r["mask_build_bound_bytes"]


def _check_lora_te(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    import check_lora_te

    return check_lora_te


@pytest.mark.timeout(300)  # ~45 s: 4 tiny models loaded, fp32 and bf16
def test_check_lora_te_dry_run_passes_on_te_fakes(monkeypatch):
    """``bench/check_lora_te.py`` on CPU: LoRA on the fake-TE spec (megatron's real TE layer
    spec over tests/te_fakes.py) equals LoRA on the SDPA spec, embeddings and every adapter's
    gradients, padded and packed, with A gradients nonzero."""
    from megaemb import platform

    if platform.has_transformer_engine():
        pytest.skip("Transformer Engine is installed: the fakes would shadow it")
    r = _check_lora_te(monkeypatch).run(dry_run=True)
    assert r["ok"] is True and r["te"].startswith("fakes"), r
    assert r["te_qkv_module"] == "LoRAFakeTELayerNormColumnParallelLinear"
    for layout in ("padded", "packed"):
        assert r[f"fp32_{layout}_embedding_max_diff"] <= 1e-4 and r[f"fp32_{layout}_grad_max_rel_diff"] <= 1e-3
        assert r[f"bf16_{layout}_embedding_min_cos"] >= 0.999 and r[f"bf16_{layout}_grad_min_cos"] >= 0.99
        assert r[f"fp32_{layout}_min_a_grad"] > 0
    assert r["fp32_adapters"] == r["bf16_adapters"] > 0


@pytest.mark.timeout(300)
def test_check_lora_te_fails_when_adapters_miss_ln_out(monkeypatch):
    """The bug the check exists for: TE's fused-norm linears' adapters fed the un-normalised
    input (``ln_out`` dropped) instead of the normalised one: ``ok`` is false."""
    from megaemb import platform
    from megaemb.model import lora

    if platform.has_transformer_engine():
        pytest.skip("Transformer Engine is installed: the fakes would shadow it")
    check_lora_te = _check_lora_te(monkeypatch)
    outputs = lora._outputs

    def without_ln_out(result, x):
        out, bias, _ = outputs(result, x)
        return out, bias, x

    monkeypatch.setattr(lora, "_outputs", without_ln_out)
    monkeypatch.setattr(check_lora_te, "DTYPES", ("fp32",))
    r = check_lora_te.run(dry_run=True)
    assert r["ok"] is False and r["fp32_padded_embedding_max_diff"] > 1e-3, r


@pytest.mark.timeout(240)
def test_gpu_check_fails_on_a_numeric_check(tmp_path, monkeypatch, capsys):
    """A check outside its bound makes ``gpu_check`` exit 1 and name it; the JSON keeps the
    measured number."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    import gpu_check

    monkeypatch.setattr(gpu_check, "FP32_TOLERANCE", -1.0)  # no difference can pass
    out = tmp_path / "check.json"
    assert gpu_check.main(["--dry-run", "--only", "versions,spec_parity", "--output", str(out)]) == 1
    report = json.loads(out.read_text())
    assert report["ok"] is False and report["checks"]["versions"]["ok"] is True
    assert report["checks"]["spec_parity"]["ok"] is False
    assert report["checks"]["spec_parity"]["fp32_sdpa_padded"] == 0.0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("gpu_check: FAILED: spec_parity")
