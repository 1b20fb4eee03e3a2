"""``--task_type reranker``: the sequence-classification reranker (HF
``Qwen3ForSequenceClassification``, one logit from ``score.weight [1, h]`` at the last token).

One process runs every check that needs a process group (``_checks``), the tests assert on what it
returns:
- conversion: an HF seq-cls directory -> ``export --to_mcore`` (recorded as ``reranker``) ->
  ``export --to_hf`` gives the same tensors bit for bit and a seq-cls ``config.json``; megaemb's
  scores of the MCore checkpoint (padded and packed) = transformers' logits (fp32, 1e-5);
- the classifier's first value without ``score.weight``: ``W[yes] - W[no]`` of a causal LM's
  ``lm_head`` (or the tied word embedding), zeros for an untied embedder without ``lm_head``;
  started from a Qwen3-Reranker-style causal LM, the score is the causal LM's ``l_yes - l_no``;
- training: one ``sft --task_type reranker`` step moves the classifier, its checkpoint records
  the task, and its ``export --to_hf`` scores the model card's prompts as megaemb does.
The parallel layouts (TP, SP, PP, DP, packed) are in ``test_reranker_train.py``.
"""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from distributed import run_distributed
from test_reranker_convert import _prompts
from test_reranker_export import train_one_step
from megaemb.model.heads import QWEN3_NO, QWEN3_YES

PAD = 151643
TOL = 1e-5
PAIRS = [("package for task 1", "this package does task 1 well"),
         ("package for task 1", "an unrelated library"),
         ("a text editor", "GNU Emacs is an extensible, customizable text editor, and more")]


def _save_seq_cls(out_dir) -> str:
    """A tiny random ``Qwen3ForSequenceClassification`` (one label, norms perturbed)."""
    from transformers import Qwen3ForSequenceClassification

    from megaemb.tiny import tiny_config

    torch.manual_seed(11)
    config = tiny_config()
    config.num_labels = 1
    with torch.no_grad():
        model = Qwen3ForSequenceClassification(config).float()
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
        model.score.weight.mul_(20)  # scores well away from zero
    model.save_pretrained(out_dir)
    return str(out_dir)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    import shutil

    from megaemb.tiny import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("seqcls")
    out = {"seq_cls": _save_seq_cls(root / "seq_cls"), "root": str(root),
           "untied": make_tiny_checkpoint(str(root / "untied"), seed=4, causal_lm=True),
           "tied": make_tiny_checkpoint(str(root / "tied"), seed=5, causal_lm=True, tied=True)}
    no_head = str(root / "no_head")  # an untied model without lm_head (an embedder's copy)
    shutil.copytree(out["untied"], no_head)
    tensors = load_file(os.path.join(no_head, "model.safetensors"))
    del tensors["lm_head.weight"]
    save_file(tensors, os.path.join(no_head, "model.safetensors"), metadata={"format": "pt"})
    out["no_head"] = no_head
    data = root / "groups.jsonl"
    data.write_text("".join(json.dumps({"query": q, "response": d, "rejected_response": ["x y z"]})
                            + "\n" for q, d in PAIRS))
    out["data"] = str(data)
    return out


def _scores(model, seqs, packed):
    from megaemb.data.batching import text_batch

    with torch.no_grad():
        return model(text_batch(seqs, PAD, packed=packed)).tolist()


def _checks(rank, world, m):
    from megaemb import checkpoint, export, tasks
    from megaemb.config import ParallelConfig
    from megaemb.convert.load import load_model
    from megaemb.parallel import init_parallel
    from megaemb.tasks.reranker_prompt import RerankPromptTokenizer

    init_parallel(ParallelConfig())
    root, out = m["root"], {}
    ids, lengths = _prompts()
    seqs = [row[:n].tolist() for row, n in zip(ids, lengths)]
    # HF seq-cls -> MCore -> HF
    mcore, back = os.path.join(root, "mcore"), os.path.join(root, "back")
    export.hf_to_mcore(m["seq_cls"], mcore, ParallelConfig(), attention="sdpa")
    export.mcore_to_hf(mcore, back)
    loaded = load_model(mcore, ParallelConfig(), attention="sdpa")
    loaded.model.eval()
    out["convert"] = {"task": checkpoint.read_task(mcore), "loaded_task": loaded.task.name,
                      "padded": _scores(loaded.model, seqs, False),
                      "packed": _scores(loaded.model, seqs, True), "back": back}
    # the classifier's first value, from checkpoints without score.weight
    out["init"] = {}
    for name in ("untied", "tied", "no_head"):
        model = load_model(m[name], ParallelConfig(), attention="sdpa", task=tasks.RERANKER).model
        model.eval()
        out["init"][name] = {"w": model.output_layer.weight.detach().clone(),
                             "scores": _scores(model, seqs, False)}
    # one training step from the causal LM, its checkpoint and export
    save = os.path.join(root, "run")
    trainer = train_one_step(m["untied"], m["data"], save, "reranker", attention="sdpa")
    prompts = RerankPromptTokenizer(trainer.tokenizer.tokenizer, 128)
    pair_ids = [prompts.encode_group(q, [d], source="test")[0] for q, d in PAIRS]
    trained = os.path.join(root, "trained-hf")
    export.mcore_to_hf(save, trained)
    out["train"] = {"task": checkpoint.read_task(save), "hf": trained, "ids": pair_ids,
                    "w": trainer.module.output_layer.weight.detach().clone(),
                    "scores": _scores(trainer.module, pair_ids, False)}
    return out


@pytest.fixture(scope="module")
def checked(models):
    return run_distributed(_checks, 1, models, timeout=600)[0]


@torch.no_grad()
def _hf_seq_cls_logits(path, seqs):
    """transformers' ``Qwen3ForSequenceClassification`` logits of right-padded ``seqs``."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    n = max(map(len, seqs))
    ids = torch.tensor([s + [PAD] * (n - len(s)) for s in seqs])
    mask = (ids != PAD).long()
    return model(input_ids=ids, attention_mask=mask).logits[:, 0]


@pytest.mark.timeout(900)
def test_seq_cls_round_trip_is_bit_exact_and_scores_as_transformers(models, checked):
    c = checked["convert"]
    assert c["task"] == "reranker" and c["loaded_task"] == "reranker"
    original = load_file(os.path.join(models["seq_cls"], "model.safetensors"))
    back = load_file(os.path.join(c["back"], "model.safetensors"))
    assert sorted(back) == sorted(original) and "score.weight" in back
    for key, tensor in original.items():
        assert torch.equal(back[key], tensor), key
    with open(os.path.join(c["back"], "config.json")) as f:
        config = json.load(f)
    assert config["architectures"] == ["Qwen3ForSequenceClassification"]
    assert config["num_labels"] == 1 and config["pad_token_id"] == PAD
    ids, lengths = _prompts()
    reference = _hf_seq_cls_logits(models["seq_cls"], [r[:n].tolist() for r, n in zip(ids, lengths)])
    assert float(reference.abs().max()) > 1  # not trivially zero
    for layout in ("padded", "packed"):
        got = torch.tensor(c[layout])
        assert float((got - reference).abs().max()) <= TOL, (layout, got, reference)


@pytest.mark.timeout(900)
def test_classifier_starts_as_the_yes_no_score(models, checked):
    """No ``score.weight``: ``W[yes] - W[no]`` of ``lm_head`` (untied) or the word embedding
    (tied), so the seq-cls score is the causal LM's ``l_yes - l_no``; zeros without either."""
    from transformers import AutoModelForCausalLM

    init = checked["init"]
    ids, lengths = _prompts()
    mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()
    for name, key in (("untied", "lm_head.weight"), ("tied", "model.embed_tokens.weight")):
        w = load_file(os.path.join(models[name], "model.safetensors"))[key]
        assert torch.equal(init[name]["w"], (w[QWEN3_YES] - w[QWEN3_NO])[None]), name
        with torch.no_grad():
            model = AutoModelForCausalLM.from_pretrained(models[name], dtype=torch.float32).eval()
            logits = model(input_ids=ids, attention_mask=mask).logits[
                torch.arange(len(ids)), lengths - 1]
        reference = logits[:, QWEN3_YES] - logits[:, QWEN3_NO]
        got = torch.tensor(init[name]["scores"])
        assert float(reference.abs().max()) > 1e-3
        assert float((got - reference).abs().max()) <= TOL, (name, got, reference)
    assert not init["no_head"]["w"].any() and init["no_head"]["w"].shape == (1, 64)
    assert init["no_head"]["scores"] == [0.0] * 4


@pytest.mark.timeout(900)
def test_trained_reranker_exports_to_seq_cls_and_scores_as_megaemb(models, checked):
    t = checked["train"]
    assert t["task"] == "reranker"
    w0 = load_file(os.path.join(models["untied"], "model.safetensors"))["lm_head.weight"]
    assert not torch.equal(t["w"], (w0[QWEN3_YES] - w0[QWEN3_NO])[None])  # the step trained it
    with open(os.path.join(t["hf"], "config.json")) as f:
        assert json.load(f)["architectures"] == ["Qwen3ForSequenceClassification"]
    tensors = load_file(os.path.join(t["hf"], "model.safetensors"))
    assert "lm_head.weight" not in tensors and torch.equal(tensors["score.weight"], t["w"])
    logits = _hf_seq_cls_logits(t["hf"], t["ids"])
    ours = torch.tensor(t["scores"])
    assert float(ours.std()) > 1e-3
    assert float((logits - ours).abs().max()) <= TOL, (logits, ours)


@pytest.mark.timeout(120)
def test_bad_seq_cls_inputs_are_one_line(models, tmp_path, capfd):
    """A classifier of two labels, a seq-cls directory without its classifier, a reranker
    checkpoint loaded as another task; a classifier that starts from zeros is said."""
    import shutil

    from megaemb import checkpoint
    from megaemb.config import ParallelConfig
    from megaemb.convert.hf_to_mcore import ConversionError, HFCheckpoint, load_hf_into_model
    from megaemb.model.embedder import build_model
    from megaemb.model.qwen3 import transformer_config
    from megaemb.parallel import destroy_parallel, init_parallel

    two = str(tmp_path / "two")
    shutil.copytree(models["seq_cls"], two)
    path = os.path.join(two, "model.safetensors")
    tensors = load_file(path)
    tensors["score.weight"] = torch.cat([tensors["score.weight"]] * 2)
    save_file(tensors, path, metadata={"format": "pt"})
    headless = str(tmp_path / "headless")
    shutil.copytree(models["seq_cls"], headless)
    save_file({k: v for k, v in tensors.items() if k != "score.weight"},
              os.path.join(headless, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"headless: config.json declares "
                       r"Qwen3ForSequenceClassification but the weights hold no score.weight"):
        HFCheckpoint(headless, output_layer="score")
    capfd.readouterr()
    HFCheckpoint(models["no_head"], output_layer="score")
    assert "the classifier starts from zeros, every score 0" in capfd.readouterr().err
    HFCheckpoint(models["untied"], output_layer="score")  # derived from lm_head: nothing to say
    assert capfd.readouterr().err == ""
    init_parallel(ParallelConfig())
    try:
        ckpt = HFCheckpoint(two, output_layer="score")
        config = transformer_config(ckpt.shape, ParallelConfig(), attention="sdpa")
        model = build_model(config, ckpt.shape, attention="sdpa", output_layer="score")
        with pytest.raises(ConversionError, match=r"score.weight gives shape \(2, 64\), "
                                                  r"megatron-core output_layer.weight .* \(1, 64\)"):
            load_hf_into_model(model, ckpt)
    finally:
        destroy_parallel()
    fake = tmp_path / "ckpt"
    fake.mkdir()
    (fake / "megaemb.json").write_text(json.dumps({**checkpoint.FORMAT, "task": "reranker"}))
    for wanted in ("generative_reranker", "embedding"):
        with pytest.raises(ValueError, match=f"a checkpoint of --task_type reranker, not {wanted}$"):
            checkpoint.check_task(str(fake), wanted, "--model")


@pytest.mark.timeout(120)
def test_convert_precision_of_a_seq_cls_dir_is_one_line(models, tmp_path):
    """``export --to_mcore --test_convert_precision`` compares embeddings: a seq-cls directory
    (a ``reranker``) is refused before any rank starts."""
    from megaemb.cli import build_parser, check_args

    args = build_parser().parse_args(["export", "--to_mcore", "true", "--model", models["seq_cls"],
                                      "--output_dir", str(tmp_path / "o"),
                                      "--test_convert_precision", "true"])
    with pytest.raises(ValueError, match=r"--test_convert_precision compares embeddings; --model "
                                         r".*seq_cls is a checkpoint of --task_type reranker$"):
        check_args(args)
