"""Generative reranker conversion: HF ``Qwen3ForCausalLM`` (tied / untied ``lm_head``) and
``Qwen3MoeForCausalLM`` <->
megatron-core bit for bit, megaemb's yes/no score = the CausalLM's ``l_yes - l_no``, and the
``Qwen3ForSequenceClassification`` form (``score.weight = W[yes] - W[no]``) scores the same."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from megaemb.convert.hf_to_mcore import ConversionError, HFCheckpoint
from megaemb.convert.mapping import hf_key, hf_names_for
from megaemb.model.heads import QWEN3_NO, QWEN3_YES
from megaemb.tiny import tiny_config

PAD = 151643
TOL = 1e-5


def _save_causal_lm(out_dir, tied: bool, moe: bool = False) -> str:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(5 + tied + 2 * moe)
    with torch.no_grad():
        model = AutoModelForCausalLM.from_config(tiny_config(tied=tied, moe=moe)).float()
        for p in model.parameters():  # norms start at 1: perturb so conversions are tested
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
        # the real "yes" / "no" rows differ in every feature: make the score large
        model.lm_head.weight[QWEN3_YES] += 0.5
    model.save_pretrained(out_dir)
    return str(out_dir)


@pytest.fixture(scope="module")
def causal_lms(tmp_path_factory):
    root = tmp_path_factory.mktemp("causal")
    return {kind: _save_causal_lm(root / kind, kind == "tied", kind == "moe")
            for kind in ("untied", "tied", "moe")}


def _prompts():
    """Right-padded ids (pad never inside a row), lengths."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([9, 3, 14, 6])
    ids = torch.randint(0, PAD - 1, (len(lengths), int(lengths.max())), generator=g)
    ids[torch.arange(ids.shape[1])[None] >= lengths[:, None]] = PAD
    return ids, lengths


@torch.no_grad()
def _causal_lm_scores(path, ids, lengths):
    """The reference: the CausalLM's full logits, ``l_yes - l_no`` at each row's last token."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()
    logits = model(input_ids=ids, attention_mask=mask).logits[torch.arange(len(ids)), lengths - 1]
    return logits[:, QWEN3_YES] - logits[:, QWEN3_NO]


@pytest.fixture(scope="module")
def loaded(causal_lms):
    """megaemb's backbone + (untied) output layer, TP=1, filled from each CausalLM."""
    from megaemb.config import ParallelConfig
    from megaemb.convert.hf_to_mcore import load_hf_into_model
    from megaemb.model.embedder import build_model
    from megaemb.model.heads import output_layer
    from megaemb.model.qwen3 import transformer_config
    from megaemb.parallel import destroy_parallel, init_parallel

    init_parallel(ParallelConfig())
    models = {}
    for kind, path in causal_lms.items():
        ckpt = HFCheckpoint(path, output_layer="lm_head")
        config = transformer_config(ckpt.shape, ParallelConfig(), attention="sdpa")
        model = build_model(config, ckpt.shape, attention="sdpa")
        if not ckpt.shape.tie_word_embeddings:
            model.output_layer = output_layer(config, ckpt.shape)
        load_hf_into_model(model, ckpt)
        models[kind] = (model.eval(), ckpt)
    yield models
    destroy_parallel()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["untied", "tied", "moe"])
def test_causal_lm_round_trip_bit_exact(causal_lms, loaded, kind):
    """HF -> megatron-core parameters -> HF gives the CausalLM's file back, ``lm_head``
    included when untied; the TP=2 slices of the vocabulary rows join back exactly."""
    from megaemb.convert.hf_to_mcore import _vocab_slice
    from megaemb.convert.mapping import find_mapping, qwen3_mappings, split

    model, ckpt = loaded[kind]
    table = qwen3_mappings(ckpt.shape, output_layer="lm_head")
    back = {}
    for name, param in model.named_parameters():
        rule, index = find_mapping(table, name)
        for hf_name, t in zip(rule.hf_names(**index), split(rule.kind, param.detach(), ckpt.shape)):
            back[hf_key(hf_name, "model.")] = t
    original = load_file(os.path.join(causal_lms[kind], "model.safetensors"))
    if kind == "tied":  # the head reads the word embedding: no output layer either side
        original.pop("lm_head.weight", None)
    assert ("lm_head.weight" in back) == (kind != "tied")
    assert sorted(back) == sorted(original)
    for key, tensor in original.items():
        assert torch.equal(back[key], tensor), key
    w = "lm_head.weight" if kind != "tied" else "embed_tokens.weight"
    halves = [_vocab_slice(ckpt, w, ckpt.shape, rank, 2) for rank in range(2)]
    assert torch.equal(split("vocab", torch.cat(halves), ckpt.shape)[0], original[hf_key(w, "model.")])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("kind", ["untied", "tied", "moe"])
def test_megaemb_score_matches_causal_lm(causal_lms, loaded, kind, packed):
    """Backbone's last-token hidden state . (W[yes] - W[no]) = the CausalLM's l_yes - l_no."""
    from megaemb.data.batching import text_batch
    from megaemb.model.heads import YesNoHead

    model, ckpt = loaded[kind]
    ids, lengths = _prompts()
    batch = text_batch([row[:n].tolist() for row, n in zip(ids, lengths)], PAD, packed=packed)
    weight = (model.embedding.word_embeddings if kind == "tied" else model.output_layer).weight
    with torch.no_grad():
        h_last = model(batch, normalize=False)
        scores = YesNoHead(vocab_size=ckpt.shape.vocab_size).score(h_last, weight)
    reference = _causal_lm_scores(causal_lms[kind], ids, lengths)
    assert reference.abs().max() > 1  # not trivially zero
    assert (scores - reference).abs().max() < TOL, (scores, reference)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["untied", "tied"])
def test_seq_cls_form_scores_as_causal_lm(causal_lms, tmp_path, kind):
    """transformers' Qwen3ForSequenceClassification built from ``seq_cls_tensors`` /
    ``seq_cls_config`` gives logit == the CausalLM's l_yes - l_no (fp32, right padding)."""
    from transformers import Qwen3ForSequenceClassification

    from megaemb.convert.reranker import seq_cls_config, seq_cls_tensors

    ckpt = HFCheckpoint(causal_lms[kind], output_layer="lm_head")
    tensors = ((n, ckpt.read(n)) for n in hf_names_for(ckpt.shape, output_layer="lm_head"))
    out = {hf_key(n, "model."): t.contiguous() for n, t in seq_cls_tensors(tensors, ckpt.shape)}
    assert out["score.weight"].shape == (1, ckpt.shape.hidden_size)
    assert "lm_head.weight" not in out
    save_file(out, os.path.join(tmp_path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(tmp_path, "config.json"), "w") as f:
        json.dump(seq_cls_config(ckpt.config), f)
    model = Qwen3ForSequenceClassification.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids, lengths = _prompts()
    mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    reference = _causal_lm_scores(causal_lms[kind], ids, lengths)
    assert logits.shape == (len(ids), 1)
    assert (logits[:, 0] - reference).abs().max() < TOL, (logits[:, 0], reference)


@pytest.mark.timeout(60)
def test_untied_without_lm_head(causal_lms, tmp_path):
    """An untied CausalLM copy with no ``lm_head``: the embedder loads it, a reranker is refused
    in one line."""
    import shutil

    d = str(tmp_path / "no-head")
    shutil.copytree(causal_lms["untied"], d)
    path = os.path.join(d, "model.safetensors")
    tensors = load_file(path)
    del tensors["lm_head.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    assert HFCheckpoint(d).shape.vocab_size == tensors["model.embed_tokens.weight"].shape[0]
    with pytest.raises(ConversionError,
                       match=r"no-head: no lm_head.weight, and tie_word_embeddings is false"):
        HFCheckpoint(d, output_layer="lm_head")


@pytest.mark.timeout(30)
def test_seq_cls_tensors_needs_the_output_rows(causal_lms):
    from megaemb.convert.reranker import seq_cls_tensors

    shape = HFCheckpoint(causal_lms["untied"]).shape
    with pytest.raises(ValueError, match="no lm_head.weight among the tensors"):
        list(seq_cls_tensors([("norm.weight", torch.ones(4))], shape))
