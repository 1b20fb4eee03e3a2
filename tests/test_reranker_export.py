"""``export --to_hf`` of a generative reranker checkpoint: a stock ``Qwen3ForCausalLM`` (with
``lm_head`` when untied) that the official Qwen3-Reranker transformers snippet scores as
megaemb does, and ``--to_seq_cls true``: a ``Qwen3ForSequenceClassification`` whose logit is
megaemb's score (fp32, 1e-5); sentence-transformers' ``CrossEncoder`` loads both and agrees."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from distributed import run_distributed
from test_reranker_data import official_ids
from test_train import ROOT

TOL = 1e-5
PAIRS = [("package for task 1", "this package does task 1 well"),
         ("package for task 1", "an unrelated library"),
         ("a text editor", "GNU Emacs is an extensible, customizable text editor, and more")]
INSTRUCTION = "Given a Debian package need, find the package that meets it"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Reranker checkpoints (untied, tied) after one listwise step, and megaemb's scores of
    ``PAIRS`` from the trained model."""
    from megaemb.tiny import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("rerank-export")
    data = root / "groups.jsonl"
    data.write_text("".join(json.dumps({"query": q, "response": d, "rejected_response": ["x y z"]})
                            + "\n" for q, d in PAIRS))
    models = {"untied": make_tiny_checkpoint(str(root / "untied"), seed=6, causal_lm=True),
              "tied": make_tiny_checkpoint(str(root / "tied"), seed=7, causal_lm=True, tied=True)}
    return run_distributed(_train_and_score, 1, models, str(data), str(root), timeout=300)[0]


def train_one_step(model: str, data: str, save: str, task_type: str, **kw):
    """A ``Trainer`` of ``task_type`` (listwise, 3 rows a step, lr 1e-2) after one step,
    saved to ``save`` as step 1, in eval mode. Run on a rank (``run_distributed``)."""
    from megaemb.config import SFTConfig
    from megaemb.train import Trainer

    trainer = Trainer(SFTConfig(model=model, dataset=[data], task_type=task_type,
                                loss_type="listwise_reranker", max_length=128, global_batch_size=3,
                                micro_batch_size=3, train_iters=1, lr=1e-2, save=save, **kw))
    trainer.step = 0
    trainer.train_step()
    trainer.step = 1
    trainer.save()
    trainer.module.eval()
    return trainer


def _train_and_score(rank, world, models, data, root):
    from megaemb.evaluate import rerank_metrics
    from megaemb.tasks.reranker_prompt import RerankPromptTokenizer

    out = {}
    for name, model in models.items():
        save = os.path.join(root, f"run-{name}")
        trainer = train_one_step(model, data, save, "generative_reranker", val_dataset=[data])
        prompts = RerankPromptTokenizer(trainer.tokenizer.tokenizer, 128)
        seqs = [prompts.encode_group(q, [d], source="test")[0] for q, d in PAIRS]
        instructed = [prompts.encode_group(q, [d], source="test", instruction=INSTRUCTION)[0]
                      for q, d in PAIRS]
        with torch.no_grad():
            scores = trainer.module(trainer.layout.batch(seqs))
            instructed_scores = trainer.module(trainer.layout.batch(instructed))
            groups = [trainer.module(trainer.layout.batch(prompts.encode_group(
                q, [d, "x y z"], source="test"))).numpy() for q, d in PAIRS]
        out[name] = {"save": save, "scores": scores.tolist(), "seqs": seqs,
                     "instructed_scores": instructed_scores.tolist(), "eval": trainer.evaluate(),
                     "expected_eval": rerank_metrics(groups, [[1, 0]] * len(PAIRS))}
    return out


def _export(save, out, *flags):
    proc = subprocess.run([sys.executable, "-m", "megaemb.cli", "export", "--mcore_model", save,
                           "--to_hf", "true", "--output_dir", out, *flags],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


def _official_scores(path, pairs=PAIRS, instruction=None):
    """The Qwen3-Reranker model card's snippet: P(yes) at the last position, left padding, of
    (query, document) ``pairs`` (``instruction``: the card's ``task``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    token_false_id = tokenizer.convert_tokens_to_ids("no")
    token_true_id = tokenizer.convert_tokens_to_ids("yes")
    max_length = 8192
    inputs = {"input_ids": official_ids(tokenizer, pairs, max_length, instruction)}
    inputs = tokenizer.pad(inputs, padding=True, return_tensors="pt", max_length=max_length)
    with torch.no_grad():
        batch_scores = model(**inputs).logits[:, -1, :]
    scores = torch.stack([batch_scores[:, token_false_id], batch_scores[:, token_true_id]], dim=1)
    return torch.nn.functional.log_softmax(scores, dim=1)[:, 1].exp(), inputs


@pytest.mark.timeout(900)
def test_exports_score_as_megaemb(trained, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForSequenceClassification

    for name, run in trained.items():
        ours = torch.tensor(run["scores"])
        causal = str(tmp_path / f"{name}-causal")
        _export(run["save"], causal)
        with open(os.path.join(causal, "config.json")) as f:
            assert json.load(f)["architectures"] == ["Qwen3ForCausalLM"]
        with safe_open(os.path.join(causal, "model.safetensors"), "pt") as f:
            keys = set(f.keys())
        assert ("lm_head.weight" in keys) == (name == "untied"), (name, sorted(keys)[:3])
        assert "model.embed_tokens.weight" in keys
        official, inputs = _official_scores(causal)
        assert float((official - torch.sigmoid(ours)).abs().max()) <= TOL, (name, official, ours)

        seq_cls = str(tmp_path / f"{name}-seqcls")
        _export(run["save"], seq_cls, "--to_seq_cls", "true")
        model = AutoModelForSequenceClassification.from_pretrained(seq_cls).eval()
        with torch.no_grad():
            logits = model(**inputs).logits[:, 0]
        assert float((logits - ours).abs().max()) <= TOL, (name, logits, ours)
        for path in (causal, seq_cls):
            _check_cross_encoder(path, run)
    # the scores are not trivially equal (a trained, discriminating model)
    assert float(torch.tensor(trained["untied"]["scores"]).std()) > 1e-3


def _check_cross_encoder(path, run):
    """sentence-transformers' ``CrossEncoder`` loads the export and scores ``(query, document)``
    pairs as megaemb: the same token ids (left padded for the causal LM's last position; the
    seq-cls head finds each row's last token), ``predict`` = P(yes) (the saved sigmoid), the
    logit ``l_yes - l_no`` with ``nn.Identity``, and ``prompt=`` as the instruction."""
    from sentence_transformers import CrossEncoder
    from sentence_transformers.cross_encoder.modules import LogitScore

    ours = torch.tensor(run["scores"])
    model = CrossEncoder(path, device="cpu")
    features = model[0].preprocess(PAIRS)
    mask = features["attention_mask"].bool()
    assert not mask.all(), mask  # lengths differ: padded
    causal = isinstance(model[-1], LogitScore)
    assert causal == os.path.isfile(os.path.join(path, "1_LogitScore", "config.json")), path
    assert mask[:, -1].all() or not causal, mask
    assert [ids[m].tolist() for ids, m in zip(features["input_ids"], mask)] == run["seqs"], path
    probs = torch.from_numpy(model.predict(PAIRS))
    assert float((probs - torch.sigmoid(ours)).abs().max()) <= TOL, (path, probs, ours)
    logits = torch.from_numpy(model.predict(PAIRS, activation_fn=torch.nn.Identity()))
    assert float((logits - ours).abs().max()) <= TOL, (path, logits, ours)
    instructed = torch.from_numpy(model.predict(PAIRS, prompt=INSTRUCTION,
                                                activation_fn=torch.nn.Identity()))
    expected = torch.tensor(run["instructed_scores"])
    assert float((instructed - expected).abs().max()) <= TOL, (path, instructed, expected)
    assert float((expected - ours).abs().max()) > 1e-4  # the instruction reached the model
    print(f"CrossEncoder {os.path.basename(path)}: P(yes) {float((probs - torch.sigmoid(ours)).abs().max()):.1e}, "
          f"logit {float((logits - ours).abs().max()):.1e}, "
          f"instructed {float((instructed - expected).abs().max()):.1e}")
    ranked = model.rank(PAIRS[0][0], [PAIRS[1][1], PAIRS[0][1]])
    assert [r["corpus_id"] for r in ranked] == ([1, 0] if ours[0] > ours[1] else [0, 1])


@pytest.mark.timeout(300)
def test_seq_cls_of_an_embedder_is_one_line(tmp_path):
    from megaemb import checkpoint

    fake = tmp_path / "ckpt"
    fake.mkdir()
    (fake / "megaemb.json").write_text(json.dumps(checkpoint.FORMAT))  # version 1-style: embedder
    from megaemb.cli import build_parser, check_seq_cls_export

    args = build_parser().parse_args(["export", "--mcore_model", str(fake), "--to_hf", "true",
                                      "--to_seq_cls", "true", "--output_dir", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="a checkpoint of --task_type embedding, not a generative reranker"):
        check_seq_cls_export(args, str(fake))


@pytest.mark.timeout(60)
def test_in_loop_eval_scores_every_candidate_of_the_val_rows(trained):
    """``--val_dataset`` group rows: the in-loop metrics are those of the model's scores of
    every candidate (positive first), in row order."""
    for name, run in trained.items():
        assert set(run["eval"]) == {"mrr@10", "ndcg@10", "accuracy"}, run["eval"]
        for key, value in run["expected_eval"].items():
            assert abs(run["eval"][key] - value) <= 1e-9, (name, run["eval"], run["expected_eval"])


@pytest.mark.timeout(30)
def test_rerank_metrics_by_hand():
    from megaemb.evaluate import rerank_metrics

    scores = [[0.1, 2.0, -1.0], [3.0, -2.0], [-0.5]]   # positive ranked 2nd, 1st; a negative pair
    labels = [[1, 0, 0], [1, 0], [0]]
    m = rerank_metrics(scores, labels)
    assert m["mrr@10"] == pytest.approx((1 / 2 + 1) / 2)
    assert m["ndcg@10"] == pytest.approx((1 / math.log2(3) + 1) / 2)
    # P(yes) > 0.5 agrees with the label: group 1: 0.1 (yes, right), 2.0 (wrong), -1 (right);
    # group 2 both right; the pair right
    assert m["accuracy"] == pytest.approx(5 / 6)
