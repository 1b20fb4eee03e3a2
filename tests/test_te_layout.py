"""Conversion and checkpoints do not depend on the layer spec (Transformer Engine vs local/SDPA).

Without a TE install, ``te_fakes`` stands in for TE's spec provider, and megatron's REAL TE
layer-spec function builds the layers from it (fused norms, IdentityOps, MoE layers keeping
``pre_mlp_layernorm``, the layers' keys maps). One 2-process gloo group checks:
  * HF -> fake-TE model (dense TP=2; MoE TP=2 + SP, i.e. expert tensor parallel 2; MoE EP=2)
    gives HF ``Qwen3Model`` last-token embeddings;
  * both specs' ``sharded_state_dict()`` have one key set (and no ``_extra_state``);
  * a checkpoint saved under either spec loads under the other bit-exact (dense TP=2, MoE EP=2),
    and a MoE checkpoint with the key spelling of earlier megaemb versions still loads;
  * ``export --to_hf`` of a fake-TE-saved checkpoint gives the original HF weights bit-exact.

What stays UNPROVEN without a real TE install (the fakes encode assumptions read from
megatron-core 0.16.1's source, not TE's behaviour):
  * TE's real ``partition_dim`` / ``tensor_model_parallel`` attributes (the fake assumes dim 0 on
    expert ``linear_fc2`` under expert/tensor parallelism, per megatron's TELinear using
    ``parallel_mode=None``); conversion no longer reads them, so only the assumption that TE's
    *shapes* follow megatron's column/row split matters;
  * TE's ``_extra_state`` content (FP8 metadata) and whether dropping it is harmless when FP8
    is on (megaemb never enables FP8);
  * whether TE modules fill in a missing ``_extra_state`` on ``load_state_dict`` (the fake
    does not; megaemb tolerates its absence either way);
  * ``TEGroupedMLP`` (``moe_grouped_gemm=True``, what CUDA + TE builds): faked after megatron's
    ``TEGroupedLinear`` (``weight{i}``, its sharded keys) and round-tripped in
    ``tests/test_lora_te.py``; TE's ``GroupedLinear`` kernels themselves are not;
  * numerics of TE's fused kernels (LayerNormLinear, fused attention, bf16/fp8 GEMMs): the fake
    computes RMSNorm + matmul + SDPA in fp32;
  * that real TE fails on the ``meta`` device (the fake refuses it, standing for that);
  * TE's ``TENorm`` for q/k norms marks its weight ``sequence_parallel`` (the fake uses
    HeadRMSNorm, which does not); megatron's finalize_model_grads sums q/k-norm grads over TP
    by name either way, so this should not matter, but no gradient is checked here;
  * the legacy-key remap for *optimizer* state of a resumed MoE run (only model weights of an
    old-spelling checkpoint are tested);
  * TE versions < 1.9 (FusedLayerNorm for q/k norms) or < 1.7 (local expert linears).
"""
import os
import time

import pytest
import torch

from distributed import run_distributed
from hf_reference import assert_same_weights

COS = 0.99999


def _layouts():
    from megaemb.config import ParallelConfig as P

    return [
        ("dense", "tp2", P(tensor_model_parallel_size=2)),
        ("dense", "tp2-sp", P(tensor_model_parallel_size=2, sequence_parallel=True)),
        ("moe", "etp2-sp", P(tensor_model_parallel_size=2, sequence_parallel=True)),  # ETP = TP
        ("moe", "ep2", P(expert_model_parallel_size=2)),
    ]


def _keys(sharded):
    """Checkpoint keys (with global shape where there is one) of a sharded state dict."""
    return {(v.key, tuple(getattr(v, "global_shape", ()))) for v in sharded.values()}


def _by_canonical_name(model):
    from megaemb.convert.mapping import canonical_name

    return {canonical_name(n): p.detach().clone() for n, p in model.named_parameters()}


def _mismatches(a: dict, b: dict) -> list[str]:
    if sorted(a) != sorted(b):
        return [f"names differ: {sorted(set(a) ^ set(b))}"]
    return [n for n in a if a[n].shape != b[n].shape or not torch.equal(a[n], b[n])]


def _legacy_moe_keys(model):
    """Give MoE layers the keys map of megaemb <= f48286a (pre-MLP norm under TE's dense name)."""
    import dataclasses

    for layer in model.decoder.layers:
        if hasattr(layer.mlp, "router"):
            keys = dict(layer.submodules_config.sharded_state_dict_keys_map,
                        **{"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"})
            layer.submodules_config = dataclasses.replace(layer.submodules_config,
                                                          sharded_state_dict_keys_map=keys)


def _te_group(rank, world, models, out_root):
    import te_fakes
    from hf_reference import PAD, compare, hf_embeddings, random_batch, token_lists
    from megaemb import checkpoint, export
    from megaemb.config import ParallelConfig as P
    from megaemb.convert.load import load_model
    from megaemb.inference import forward_embeddings
    from megaemb.parallel import init_parallel

    t0 = time.time()
    ids, lengths = random_batch()
    seqs = token_lists(ids, lengths)
    refs = {k: hf_embeddings(models[k], ids, lengths) for k in ("dense", "moe")}
    results = {}
    init_parallel(P())
    te_fakes.install()

    # 1. HF -> fake-TE model, embeddings vs HF
    for name, layout, parallel in _layouts():
        init_parallel(parallel)
        lm = load_model(models[name], parallel, attention="te")
        assert type(lm.model.decoder.layers[0].self_attention.linear_qkv).__name__ == \
            "FakeTELayerNormColumnParallelLinear"
        res = compare(forward_embeddings(lm.model, seqs, pad_id=PAD, micro_batch_size=4), refs[name])
        # packed [1, T] in TE's "thd" format: megatron squeezes b, applies RoPE per document
        packed = forward_embeddings(lm.model, seqs, pad_id=PAD, micro_batch_size=4, packed=True)
        results[f"parity/{name}/{layout}/packed-thd"] = compare(packed, refs[name])
        if name == "moe":  # the TE quirk conversion must survive is really there
            fc2 = lm.model.decoder.layers[0].mlp.experts.local_experts[0].linear_fc2.weight
            res["expert_fc2_partition_dim"] = fc2.partition_dim
        results[f"parity/{name}/{layout}"] = res
    t1 = time.time()

    # 2. one key set; 3. checkpoints cross specs; 4. export of a TE-saved checkpoint
    for name, parallel in [("dense", P(tensor_model_parallel_size=2)),
                           ("moe", P(expert_model_parallel_size=2))]:
        init_parallel(parallel)
        models_by_spec = {spec: load_model(models[name], parallel, attention=spec).model
                          for spec in ("te", "sdpa")}
        sharded = {spec: m.sharded_state_dict() for spec, m in models_by_spec.items()}
        results[f"keys/{name}"] = {
            "te_only": sorted(_keys(sharded["te"]) - _keys(sharded["sdpa"])),
            "sdpa_only": sorted(_keys(sharded["sdpa"]) - _keys(sharded["te"])),
            "extra_state": [k for s in sharded.values() for k in s if "_extra_state" in k]}
        weights = {spec: _by_canonical_name(m) for spec, m in models_by_spec.items()}
        assert not _mismatches(weights["te"], weights["sdpa"])
        hf_dir = models[name]
        for saved, loaded in (("te", "sdpa"), ("sdpa", "te")):
            path = os.path.join(out_root, f"{name}-{saved}")
            checkpoint.save_checkpoint(path, 0, models_by_spec[saved].sharded_state_dict(), hf_dir)
            back = load_model(path, parallel, attention=loaded).model
            results[f"ckpt/{name}/{saved}->{loaded}"] = {"mismatches": _mismatches(
                _by_canonical_name(back), weights[loaded])}
        if name == "moe":  # a checkpoint written by earlier megaemb versions
            path = os.path.join(out_root, "moe-legacy")
            _legacy_moe_keys(models_by_spec["sdpa"])
            legacy = models_by_spec["sdpa"].sharded_state_dict()
            assert any(v.key.endswith("0.mlp.linear_fc1.layer_norm_weight") for v in legacy.values())
            checkpoint.save_checkpoint(path, 0, legacy, hf_dir)
            results["ckpt/moe/legacy->te"] = {"mismatches": _mismatches(
                _by_canonical_name(load_model(path, parallel, attention="te").model), weights["te"])}
        init_parallel(P())
        export.mcore_to_hf(os.path.join(out_root, f"{name}-te"), os.path.join(out_root, f"{name}-te-hf"))
    t2 = time.time()
    te_fakes.uninstall()
    results["timing"] = {"parity_s": t1 - t0, "checkpoints_export_s": t2 - t1}
    return results


@pytest.fixture(scope="module")
def te_group(tiny_models, tmp_path_factory):
    from megaemb import platform

    if platform.has_transformer_engine():
        pytest.skip("Transformer Engine is installed: the fakes would shadow it")
    out = tmp_path_factory.mktemp("te_layout")
    results = run_distributed(_te_group, 2, tiny_models, str(out), timeout=600)
    for label, res in results[0].items():  # shown with -s
        print(f"te_group rank 0 {label}: {res}")
    return results, tiny_models, out


@pytest.mark.timeout(700)
@pytest.mark.parametrize("label", [f"{n}/{l}" for n, l, _ in _layouts()])
def test_fake_te_model_from_hf_matches_hf(te_group, label):
    results, _, _ = te_group
    for rank, res in enumerate(results):
        r = res[f"parity/{label}"]
        assert r["cos_min"] >= COS and r["max_abs"] < 1e-4, (rank, label, r)
        if label.startswith("moe/"):
            assert r["expert_fc2_partition_dim"] == 0, "the fake lost TE's partition_dim quirk"
        r = res[f"parity/{label}/packed-thd"]
        assert r["cos_min"] >= COS and r["max_abs"] < 1e-4, (rank, label, "packed", r)


@pytest.mark.timeout(700)
@pytest.mark.parametrize("name", ["dense", "moe"])
def test_one_checkpoint_key_set(te_group, name):
    results, _, _ = te_group
    for rank, res in enumerate(results):
        assert res[f"keys/{name}"] == {"te_only": [], "sdpa_only": [], "extra_state": []}, (rank, res[f"keys/{name}"])


@pytest.mark.timeout(700)
@pytest.mark.parametrize("label", ["dense/te->sdpa", "dense/sdpa->te", "moe/te->sdpa", "moe/sdpa->te",
                                   "moe/legacy->te"])
def test_checkpoint_loads_across_specs_bit_exact(te_group, label):
    results, _, _ = te_group
    for rank, res in enumerate(results):
        assert res[f"ckpt/{label}"]["mismatches"] == [], (rank, label, res[f"ckpt/{label}"])


@pytest.mark.timeout(700)
@pytest.mark.parametrize("name", ["dense", "moe"])
def test_export_of_te_checkpoint_is_bit_exact(te_group, name):
    _, models, out = te_group
    assert_same_weights(models[name], os.path.join(out, f"{name}-te-hf"))


@pytest.mark.timeout(60)
def test_te_attention_without_te_is_a_clear_error():
    from megaemb import platform
    from megaemb.config import ParallelConfig, SFTConfig
    from megaemb.model.qwen3 import block_spec, transformer_config
    from megaemb.shape import Qwen3Shape
    from megaemb.tiny import tiny_config

    if platform.has_transformer_engine():
        pytest.skip("Transformer Engine is installed")
    config = transformer_config(Qwen3Shape.from_hf(tiny_config().to_dict()), ParallelConfig())
    with pytest.raises(ValueError, match=r"^--attention te needs Transformer Engine, which is not installed$"):
        block_spec(config, "te")
    cfg = SFTConfig(model="m", dataset=["d"], train_iters=1, attention="flash")
    with pytest.raises(ValueError, match=r"^--attention 'flash': expected one of 'auto', 'te', 'sdpa', 'local'$"):
        cfg.validate()


@pytest.mark.timeout(60)
def test_attention_flag_reaches_export_embed_and_sft():
    from megaemb.cli import build_parser, sft_config

    p = build_parser()
    for cmd in (["export", "--output_dir", "o", "--to_hf", "true"], ["embed", "--model", "m", "--input", "i",
                                                                      "--output", "o"]):
        assert p.parse_args(cmd).attention == "auto"
        assert p.parse_args(cmd + ["--attention", "sdpa"]).attention == "sdpa"
    args = p.parse_args(["sft", "--model", "m", "--dataset", "d", "--train_iters", "1", "--attention", "local"])
    assert sft_config(args).attention == "local"
