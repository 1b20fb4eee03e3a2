"""LoRA on Transformer Engine's layer spec, proven on CPU with ``te_fakes`` (no TE install).

One 2-process gloo group trains LoRA on the fake-TE spec and on the SDPA spec (TP=2, TP=2+SP,
and a MoE model with its experts adapted under EP=2)
and checks that they agree: losses, gradient norms and every adapter's gradient at step 2 (A
and B both nonzero). The fused-norm linears (``linear_qkv``, dense ``linear_fc1``) feed the
adapter TE's normalised input ``ln_out``; feeding it the un-normalised input would differ. A
LoRA checkpoint saved under the TE spec loads with ``--attention auto`` (TE wherever it
imports, so every inference command of an NVIDIA container) and gives the SDPA-loaded
embeddings, padded and packed (THD); its merged and PEFT exports equal those of the
SDPA-trained checkpoint (the TE one exported by 2 ranks: the PEFT export used to load on
rank 0 alone, a collective the other rank never joined). A fake ``TEGroupedMLP`` (``weight{i}``) model round-trips HF ->
checkpoint -> SDPA spec bit-exact, and LoRA on experts refuses it.

Unproven without TE: TE's real kernels (the fake norm + matmul is fp32 torch).
"""
import os

import pytest
import torch

from distributed import run_distributed
from hf_reference import assert_same_weights
from test_lora import _cfg
from test_train import _megaemb

LAYOUTS = [("tp2", "dense", dict(tensor_model_parallel_size=2)),
           ("tp2-sp", "dense", dict(tensor_model_parallel_size=2, sequence_parallel=True)),
           # experts adapted too, on TE's expert linears (SequentialMLP without grouped GEMM)
           ("moe-ep2", "moe", dict(expert_model_parallel_size=2, target_modules=["all-linear", "experts"]))]
STEPS = 2


def _train(cfg, save: bool) -> dict:
    """``STEPS`` steps: per step (loss, grad norm), the adapters' gradients of the last step
    (DDP's buffers) and the trained adapters; saves the run when ``cfg.save``."""
    from megaemb.train import Trainer

    trainer = Trainer(cfg)
    qkv = trainer.module.decoder.layers[0].self_attention.linear_qkv
    steps = []
    for trainer.step in range(STEPS):
        stats = trainer.train_step()
        steps.append((trainer.step + 1, stats["loss"], stats["grad_norm"]))
    lora = {n: p for n, p in trainer.module.named_parameters() if ".lora_" in n}
    if save:
        trainer.step = STEPS
        trainer.save()
    return {"steps": steps, "qkv": type(qkv).__name__,
            "grads": {n: p.main_grad.detach().clone() for n, p in lora.items()},
            "weights": {n: p.detach().clone() for n, p in lora.items()}}


def _max_rel(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b) and a, (sorted(a), sorted(b))
    return max(float((a[n] - b[n]).abs().max() / b[n].abs().max().clamp_min(1e-12)) for n in a)


def _grouped_round_trip(models, out_root, results):
    """moe_grouped_gemm (what CUDA + TE sets): megatron's real TEGroupedMLP over the fake
    grouped linears, HF -> model == HF's embeddings, checkpoint -> SDPA spec bit-exact."""
    from unittest import mock

    from hf_reference import PAD, compare, hf_embeddings, random_batch, token_lists
    from megaemb import checkpoint, export, platform
    from megaemb.config import LoRAConfig, ParallelConfig as P
    from megaemb.convert.load import load_model
    from megaemb.inference import forward_embeddings
    from megaemb.model.lora import apply_lora
    from megaemb.parallel import init_parallel
    from test_te_layout import _by_canonical_name, _mismatches

    ids, lengths = random_batch()
    fusions = platform.fusions
    parallel = P(expert_model_parallel_size=2)
    init_parallel(parallel)
    with mock.patch.object(platform, "fusions", lambda a: {**fusions(a), "moe_grouped_gemm": a == "te"}):
        grouped = load_model(models["moe"], parallel, attention="te").model
    experts = grouped.decoder.layers[0].mlp.experts
    results["grouped/module"] = [type(experts).__name__, sorted(n for n, _ in experts.named_parameters())]
    results["grouped/parity"] = compare(forward_embeddings(grouped, token_lists(ids, lengths), pad_id=PAD),
                                        hf_embeddings(models["moe"], ids, lengths))
    path = os.path.join(out_root, "moe-grouped")
    checkpoint.save_checkpoint(path, 0, grouped.sharded_state_dict(), models["moe"])
    back = load_model(path, parallel, attention="sdpa").model
    results["grouped/ckpt->sdpa"] = _mismatches(_by_canonical_name(back), _by_canonical_name(grouped))
    try:
        apply_lora(grouped, LoRAConfig(target_modules=("experts",)))
    except ValueError as e:
        results["grouped/lora"] = str(e)
    init_parallel(P())
    export.mcore_to_hf(path, os.path.join(out_root, "moe-grouped-hf"))


def _group(rank, world, models, out_root):
    import te_fakes
    from hf_reference import PAD, compare, random_batch, token_lists
    from megaemb.config import ParallelConfig as P
    from megaemb.convert.load import load_model
    from megaemb.inference import forward_embeddings
    from megaemb.parallel import init_parallel

    te_fakes.install()
    results = {}
    runs = {}
    for label, model, kw in LAYOUTS:
        for spec in ("te", "sdpa"):
            save = os.path.join(out_root, f"{label}-{spec}") if label == "tp2" else None
            runs[label, spec] = _train(_cfg(models[model], train_iters=STEPS, attention=spec, save=save,
                                            save_interval=STEPS, **kw), save is not None)
        te, sdpa = runs[label, "te"], runs[label, "sdpa"]
        results[f"train/{label}"] = {
            "qkv": te["qkv"], "steps_te": te["steps"], "steps_sdpa": sdpa["steps"],
            "grads": _max_rel(te["grads"], sdpa["grads"]), "weights": _max_rel(te["weights"], sdpa["weights"]),
            "a_grad": min(float(g.abs().max()) for n, g in te["grads"].items() if "lora_a" in n)}
    # a LoRA checkpoint under --attention auto (= TE here), padded and packed, vs the SDPA spec
    ids, lengths = random_batch()
    seqs = token_lists(ids, lengths)
    parallel = P(tensor_model_parallel_size=2)
    init_parallel(parallel)
    ckpt = os.path.join(out_root, "tp2-te")
    auto = load_model(ckpt, parallel, attention="auto").model
    sdpa = load_model(ckpt, parallel, attention="sdpa").model
    results["auto/qkv"] = type(auto.decoder.layers[0].self_attention.linear_qkv).__name__
    for packed in (False, True):
        results[f"auto/packed={packed}"] = compare(
            forward_embeddings(auto, seqs, pad_id=PAD, packed=packed),
            forward_embeddings(sdpa, seqs, pad_id=PAD, packed=packed))
    _grouped_round_trip(models, out_root, results)
    te_fakes.uninstall()
    return results


@pytest.fixture(scope="module")
def lora_te(tiny_models, tmp_path_factory):
    from megaemb import platform

    if platform.has_transformer_engine():
        pytest.skip("Transformer Engine is installed: the fakes would shadow it")
    out = tmp_path_factory.mktemp("lora_te")
    results = run_distributed(_group, 2, tiny_models, str(out), timeout=600)
    for label, res in results[0].items():  # shown with -s
        print(f"lora_te rank 0 {label}: {res}")
    return results, tiny_models, str(out)


@pytest.mark.timeout(700)
@pytest.mark.parametrize("label", [label for label, _, _ in LAYOUTS])
def test_lora_on_fake_te_spec_equals_sdpa_spec(lora_te, label):
    from test_train import _close

    results, _, _ = lora_te
    for rank, res in enumerate(results):
        r = res[f"train/{label}"]
        assert r["qkv"] == "LoRAFakeTELayerNormColumnParallelLinear", r["qkv"]
        assert r["a_grad"] > 0, r  # step 2 has A gradients (B moved at step 1)
        assert _close(r["steps_te"], r["steps_sdpa"]) <= 1e-5, (rank, r)
        assert r["grads"] <= 1e-5 and r["weights"] <= 1e-5, (rank, r)


@pytest.mark.timeout(700)
def test_lora_checkpoint_loads_with_attention_auto_under_te(lora_te):
    results, _, _ = lora_te
    for rank, res in enumerate(results):
        assert res["auto/qkv"] == "LoRAFakeTELayerNormColumnParallelLinear", res["auto/qkv"]
        for packed in (False, True):
            r = res[f"auto/packed={packed}"]
            assert r["cos_min"] >= 0.99999 and r["max_abs"] < 1e-5, (rank, packed, r)


@pytest.mark.timeout(700)
@pytest.mark.parametrize("kind", ["merged", "peft"])
def test_lora_exports_of_te_checkpoint_equal_sdpa(lora_te, kind):
    from safetensors.torch import load_file

    _, _, out = lora_te
    for spec, nproc in (("te", 2), ("sdpa", 1)):  # 2 ranks: every rank loads, rank 0 writes
        r = _megaemb("export", "--mcore_model", os.path.join(out, f"tp2-{spec}"), "--to_hf", "true",
                     "--output_dir", os.path.join(out, f"{kind}-{spec}"), "--merge_lora", str(kind == "merged"),
                     nproc=nproc, timeout=240)
        assert r.returncode == 0, r.stderr[-3000:]
    files = {spec: sorted(f for f in os.listdir(os.path.join(out, f"{kind}-{spec}")) if f.endswith(".safetensors"))
             for spec in ("te", "sdpa")}
    assert files["te"] == files["sdpa"] and files["te"], files
    for name in files["te"]:
        te = load_file(os.path.join(out, f"{kind}-te", name))
        sdpa = load_file(os.path.join(out, f"{kind}-sdpa", name))
        assert sorted(te) == sorted(sdpa)
        worst = max(float((te[k] - sdpa[k]).abs().max()) for k in te)
        assert worst <= 1e-5, (kind, name, worst)


@pytest.mark.timeout(700)
def test_fake_te_grouped_mlp_round_trips(lora_te):
    results, models, out = lora_te
    for rank, res in enumerate(results):
        module, names = res["grouped/module"]
        assert module == "TEGroupedMLP" and names == ["linear_fc1.weight0", "linear_fc1.weight1",
                                                      "linear_fc2.weight0", "linear_fc2.weight1"], names
        r = res["grouped/parity"]
        assert r["cos_min"] >= 0.99999 and r["max_abs"] < 1e-4, (rank, r)
        assert res["grouped/ckpt->sdpa"] == [], res["grouped/ckpt->sdpa"]
        assert "SequentialMLP" in res["grouped/lora"], res["grouped/lora"]
    assert_same_weights(models["moe"], os.path.join(out, "moe-grouped-hf"))
