"""``sft --task_type generative_reranker --train_type lora``: only the adapters train (the
output layer whose yes/no rows score stays the base's, like the embedding), the checkpoint
resumes (under TP=2 too), TP=2 equals one rank, and both exports -- merged ``--merge_lora
true`` (official snippet, ``CrossEncoder``) and the PEFT folder on ``Qwen3ForCausalLM`` --
score as megaemb does (fp32, 1e-5). Real gloo groups on CPU."""
import json
import os
import shutil

import pytest
import torch

from distributed import run_distributed
from test_reranker_export import INSTRUCTION, PAIRS, TOL, _check_cross_encoder, _export, _official_scores
from test_reranker_train import write_group_rows
from test_train import _close

ROWS = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from megaemb.tiny import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("rerank-lora")
    return {"base": make_tiny_checkpoint(str(root / "base"), seed=9, causal_lm=True),
            "data": write_group_rows(root / "groups.jsonl", ROWS, 2), "root": str(root)}


def _cfg(m, **kw):
    from megaemb.config import SFTConfig

    base = dict(model=m["base"], dataset=[m["data"]], task_type="generative_reranker",
                loss_type="listwise_reranker", max_length=96, micro_batch_size=2,
                global_batch_size=ROWS, train_iters=4, lr=1e-2, clip_grad=1e9, seed=42,
                train_type="lora", lora_rank=4, lora_alpha=8.0, lora_dropout=0.0)
    return SFTConfig(**{**base, **kw})


def _scores(trainer, instruction=None):
    """megaemb's scores ``l_yes - l_no`` of ``PAIRS`` and their prompts' token ids."""
    from megaemb.tasks.reranker_prompt import RerankPromptTokenizer

    prompts = RerankPromptTokenizer(trainer.tokenizer.tokenizer, 96)
    seqs = [prompts.encode_group(q, [d], source="test", instruction=instruction)[0] for q, d in PAIRS]
    trainer.module.eval()
    with torch.no_grad():
        return trainer.module(trainer.layout.batch(seqs)).tolist(), seqs


def _one_rank(rank, world, m):
    from megaemb.train import Trainer

    save = os.path.join(m["root"], "lora")
    trainer = Trainer(_cfg(m, save=save, save_interval=2))
    before = {n: p.detach().clone() for n, p in trainer.module.named_parameters()}
    losses = trainer.run()["losses"]
    params = dict(trainer.module.named_parameters())
    scores, seqs = _scores(trainer)
    return {"save": save, "losses": losses, "names": sorted(params),
            "trainable": sorted(n for n, p in params.items() if p.requires_grad),
            "changed": sorted(n for n, p in params.items() if not torch.equal(p, before[n])),
            "scores": scores, "seqs": seqs, "instructed_scores": _scores(trainer, INSTRUCTION)[0]}


def _two_ranks(rank, world, m, save):
    """TP=2 from the start, and the step-2 checkpoint of the one-rank run resumed under TP=2."""
    import torch.distributed as dist

    from megaemb import checkpoint
    from megaemb.train import Trainer

    tp2 = Trainer(_cfg(m, tensor_model_parallel_size=2)).run()["losses"]
    resumed = os.path.join(m["root"], "resumed")
    if rank == 0:  # as if killed after the step-2 save
        shutil.copytree(save, resumed)
        shutil.rmtree(os.path.join(resumed, "iter_0000004"))
        checkpoint.write_atomic(os.path.join(resumed, checkpoint.TRACKER), "2")
    dist.barrier()
    trainer = Trainer(_cfg(m, save=resumed, save_interval=0, tensor_model_parallel_size=2))
    return {"tp2": tp2, "resumed-tp2": trainer.run()["losses"]}


@pytest.mark.timeout(900)
def test_reranker_lora_trains_resumes_and_exports(setup, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = run_distributed(_one_rank, 1, setup, timeout=400)[0]
    # only the adapters train, and each moved; the output layer (yes/no rows) stays the base's
    assert "output_layer.weight" in out["names"]
    assert out["trainable"] == [n for n in out["names"] if ".lora_" in n] and len(out["trainable"]) == 32
    assert out["changed"] == out["trainable"], out["changed"]
    losses = [loss for _, loss in out["losses"]]
    assert losses[-1] < losses[0] - 0.02, losses  # it learns (the same 4 queries every step)
    got = run_distributed(_two_ranks, 2, setup, out["save"], timeout=500)[0]
    diffs = {"tp2": _close(got["tp2"], out["losses"]),
             "resumed-tp2": _close(got["resumed-tp2"], out["losses"][2:])}

    ours = torch.tensor(out["scores"])
    merged = str(tmp_path / "merged")
    _export(out["save"], merged, "--merge_lora", "true")
    official, inputs = _official_scores(merged)
    diffs["merged official vs megaemb"] = float((official - torch.sigmoid(ours)).abs().max())
    _check_cross_encoder(merged, out)
    base_weights = load_file(os.path.join(setup["base"], "model.safetensors"))
    assert torch.equal(load_file(os.path.join(merged, "model.safetensors"))["lm_head.weight"],
                       base_weights["lm_head.weight"])

    adapter = str(tmp_path / "adapter")
    _export(out["save"], adapter)
    with open(os.path.join(adapter, "adapter_config.json")) as f:
        assert json.load(f)["task_type"] == "CAUSAL_LM"
    base = AutoModelForCausalLM.from_pretrained(setup["base"], dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, adapter).eval()
    with torch.no_grad():
        last = peft(**inputs).logits[:, -1]
    diffs["peft vs megaemb"] = float((last[:, 9693] - last[:, 2152] - ours).abs().max())
    with torch.no_grad(), peft.disable_adapter():
        plain = peft(**inputs).logits[:, -1]
    moved = float((plain[:, 9693] - plain[:, 2152] - ours).abs().max())
    print("reranker LoRA differences:", {k: f"{v:.1e}" for k, v in diffs.items()}, f"moved {moved:.2e}")
    assert moved > 1e-3, moved  # the adapters change the score
    assert all(v <= TOL for v in diffs.values()), (diffs, got, out["losses"])
