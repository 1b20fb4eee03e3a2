"""Training on real data learns: 200 InfoNCE steps on debian-desc (bundled slice) raise dev
retrieval well above the untrained model (measured: recall@10 0.14 -> 0.48, about 85 s)."""
import os

import pytest

from distributed import run_distributed

DATA = os.path.join(os.path.dirname(__file__), "..", "demo", "data")


def _train_and_eval(rank, world, model):
    from megaemb.config import SFTConfig
    from megaemb.train import Trainer

    cfg = SFTConfig(model=model, dataset=[os.path.join(DATA, "train.jsonl#1200")],
                    val_dataset=[os.path.join(DATA, "dev.jsonl")], eval_limit=200, max_length=64,
                    micro_batch_size=16, global_batch_size=16, train_iters=200, lr=1e-4,
                    lr_decay_style="constant", weight_decay=0.0, infonce_temperature=0.05,
                    log_interval=50, seed=42)
    history = Trainer(cfg).run()
    return history["eval_before"], history["eval_after"]


@pytest.mark.timeout(600)
def test_debian_desc_recall_rises(tiny_models):
    before, after = run_distributed(_train_and_eval, 1, tiny_models["dense"], timeout=540)[0]
    print(f"dev recall@10 {before['recall@10']:.3f} -> {after['recall@10']:.3f}")
    assert before["recall@10"] < 0.25
    assert after["recall@10"] >= before["recall@10"] + 0.2, (before, after)
    assert after["mrr@10"] > 2 * before["mrr@10"], (before, after)
