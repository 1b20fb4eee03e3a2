"""MCore embedding model vs HF Qwen3Model, and HF -> MCore -> HF, under real gloo groups.

One 2-process group runs every layout (starting ranks costs seconds each).
"""
import os

import pytest
import torch

from distributed import run_distributed
from hf_reference import assert_same_weights

COS = 0.99999


def _layouts():
    from megaemb.config import ParallelConfig as P

    return [
        ("dense", "tp1-dp2", P()),
        ("dense", "tp2", P(tensor_model_parallel_size=2)),
        ("dense", "tp2-sp", P(tensor_model_parallel_size=2, sequence_parallel=True)),
        ("dense", "pp2", P(pipeline_model_parallel_size=2)),
        ("tied", "tp2", P(tensor_model_parallel_size=2)),
        ("tied", "pp2", P(pipeline_model_parallel_size=2)),
        ("moe", "ep2", P(expert_model_parallel_size=2)),
        ("moe", "tp2-sp", P(tensor_model_parallel_size=2, sequence_parallel=True)),
    ]


def _parity_group(rank, world, models, out_root):
    from hf_reference import PAD, compare, hf_embeddings, random_batch, token_lists
    from megaemb import export
    from megaemb.config import ParallelConfig as P
    from megaemb.convert.load import load_model
    from megaemb.inference import forward_embeddings
    from megaemb.parallel import init_parallel

    ids, lengths = random_batch()
    seqs = token_lists(ids, lengths)
    refs = {k: hf_embeddings(v, ids, lengths) for k, v in models.items()}
    results = {}

    def embed(model, rows=seqs, **kw):
        return forward_embeddings(model, rows, pad_id=PAD, **kw)

    def check(label, path, parallel, reference, **kw):
        init_parallel(parallel)
        lm = load_model(path, parallel, **kw)
        results[label] = compare(embed(lm.model, micro_batch_size=4), reference)
        if kw.get("attention") != "local":  # the same texts packed [1, T], document-masked
            results[label + "/packed"] = compare(embed(lm.model, micro_batch_size=4, packed=True),
                                                 reference)

    for name, layout, parallel in _layouts():
        check(f"{name}/{layout}", models[name], parallel, refs[name])
    check("dense/local-attention", models["dense"], P(), refs["dense"], attention="local")
    # Matryoshka: first 16 dims renormalised
    init_parallel(P(tensor_model_parallel_size=2))
    lm = load_model(models["dense"], P(tensor_model_parallel_size=2))
    emb16 = embed(lm.model, dim=16)
    results["dense/mrl16"] = compare(emb16, torch.nn.functional.normalize(
        hf_embeddings_full(models["dense"], ids, lengths)[:, :16], dim=-1))
    # right padding changes nothing: each row alone, unpadded, gives the batched vector
    alone = torch.cat([embed(lm.model, [row]) for row in seqs])
    results["dense/unpadded-rows"] = compare(alone, embed(lm.model))
    # one pack of all texts, and packs whose rounding tail is a padding document
    results["dense/one-pack"] = compare(embed(lm.model, packed=True, micro_batch_size=len(seqs)), alone)

    # HF -> MCore (saved under one layout) -> loaded under another -> HF (TP=1, DP=2)
    for name, save_layout, load_layout in [
        ("dense", P(tensor_model_parallel_size=2), P(pipeline_model_parallel_size=2)),
        ("tied", P(pipeline_model_parallel_size=2), P(tensor_model_parallel_size=2, sequence_parallel=True)),
        ("moe", P(expert_model_parallel_size=2), P(tensor_model_parallel_size=2)),
    ]:
        mcore = os.path.join(out_root, f"{name}-mcore")
        init_parallel(save_layout)
        export.hf_to_mcore(models[name], mcore, save_layout)
        check(f"{name}/mcore-reloaded", mcore, load_layout, refs[name])
        init_parallel(P())
        export.mcore_to_hf(mcore, os.path.join(out_root, f"{name}-hf"))
    return results


def hf_embeddings_full(path, ids, lengths):
    from transformers import AutoModel

    with torch.no_grad():
        model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
        mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    return hidden[torch.arange(ids.shape[0]), lengths - 1]


@pytest.fixture(scope="module")
def parity(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("roundtrip")
    results = run_distributed(_parity_group, 2, tiny_models, str(out), timeout=600)
    return results, tiny_models, out


@pytest.mark.timeout(700)
@pytest.mark.parametrize("label", [f"{n}/{l}{p}" for n, l, _ in _layouts() for p in ("", "/packed")]
                         + ["dense/local-attention", "dense/mrl16", "dense/unpadded-rows",
                            "dense/one-pack", "moe/mcore-reloaded/packed",
                            "dense/mcore-reloaded",
                            "tied/mcore-reloaded", "moe/mcore-reloaded"])
def test_mcore_matches_hf(parity, label):
    results, _, _ = parity
    for rank, res in enumerate(results):
        assert res[label]["cos_min"] >= COS, (rank, label, res[label])
        assert res[label]["max_abs"] < 1e-4, (rank, label, res[label])


@pytest.mark.timeout(700)
@pytest.mark.parametrize("name", ["dense", "tied", "moe"])
def test_roundtrip_bit_exact(parity, name):
    _, models, out = parity
    assert_same_weights(models[name], os.path.join(out, f"{name}-hf"))
