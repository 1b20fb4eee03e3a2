"""``--train_type lora``: adapters on megatron-core's tensor-parallel linears, their checkpoints
(adapters + a reference to the base) and exports (merged HF weights, PEFT adapter folder).
Real gloo groups on CPU, fp32."""
import os

import numpy as np
import pytest
import torch

from distributed import run_distributed
from test_global_negatives import PROBE
from test_train import DATA, ROOT, TOL, _cfg as train_cfg, _close, _megaemb

DEV = os.path.join(ROOT, "demo", "data", "dev.jsonl")


def _cfg(model, **kw):
    return train_cfg(model, **{"train_type": "lora", "lora_dropout": 0.0, "lr": 1e-3, **kw})


def _steps(cfg):
    from megaemb.train import Trainer

    trainer, out = Trainer(cfg), []
    for trainer.step in range(cfg.train_iters):
        stats = trainer.train_step()
        out.append((trainer.step + 1, stats["loss"], stats["grad_norm"]))
    return out


# ------------------------------------------------------------------------------ units

def test_lora_layer_spec():
    """``auto`` stays auto (TE where it imports) unless experts are adapted: TE's grouped
    experts (TEGroupedMLP, CUDA) have no per-expert linears."""
    from megaemb.config import LoRAConfig

    assert LoRAConfig().attention("auto") == "auto"
    assert LoRAConfig(target_modules=("linear_qkv", "experts")).attention("auto") == "sdpa"
    assert LoRAConfig(target_modules=("experts",)).attention("te") == "te"


def test_target_modules_and_flags():
    from megaemb.config import target_modules

    assert target_modules(["all-linear"]) == ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
    assert target_modules(["q_proj", "v_proj", "down_proj"]) == ("linear_qkv", "linear_fc2")
    with pytest.raises(ValueError, match="experts"):
        target_modules(["router"])
    _cfg("m", attention="te").validate()  # LoRA wraps TE's linears too (tests/test_lora_te.py)
    with pytest.raises(ValueError, match="lora_rank"):
        _cfg("m", lora_rank=0).validate()


@pytest.mark.timeout(60)
def test_fused_hf_targets_are_named():
    """``--target_modules q_proj`` adapts all of linear_qkv: the note names k_proj and v_proj."""
    from megaemb.config import fused_targets_note

    note = fused_targets_note(["q_proj", "down_proj"])
    assert note.startswith("--target_modules q_proj down_proj also adapts k_proj, v_proj:"), note
    assert "also adapts up_proj:" in fused_targets_note(["gate_proj"])
    for names in (["q_proj", "k_proj", "v_proj", "o_proj"], ["all-linear"], ["linear_qkv"], []):
        assert fused_targets_note(names) is None, names


# ------------------------------------------------------------------------------ one rank

def _one_rank(rank, world, model, save):
    """LoRA forward == merged forward; training moves only adapters; checkpoint + exports."""
    from megaemb.config import LoRAConfig, ParallelConfig
    from megaemb.convert.load import load_model
    from megaemb.data.tokenize import EmbeddingTokenizer
    from megaemb.embed import embed_texts
    from megaemb.model.lora import merge_delta
    from megaemb.parallel import init_parallel
    from megaemb.train import Trainer

    out = {}
    init_parallel(ParallelConfig())
    loaded = load_model(model, ParallelConfig(), lora=LoRAConfig(rank=4, alpha=8.0), seed=1)
    m = loaded.model.eval()
    tok = EmbeddingTokenizer(loaded.hf_dir, max_length=64)
    torch.manual_seed(0)
    adapted = [mod for mod in m.modules() if hasattr(mod, "lora_b")]
    with torch.no_grad():
        for mod in adapted:
            mod.lora_b.weight.normal_(0, 0.05)
    with_lora = embed_texts(m, tok, PROBE)
    with torch.no_grad():
        for mod in adapted:
            mod.weight.copy_(merge_delta(mod.weight, mod.lora_a.weight, mod.lora_b.weight, mod.lora.scale))
            mod.lora_b.weight.zero_()
    merged = embed_texts(m, tok, PROBE)
    out["forward_vs_merged_cos"] = float((with_lora * merged).sum(-1).min())
    out["adapted"] = len(adapted)

    cfg = _cfg(model, train_iters=3, save=save, save_interval=3)
    trainer = Trainer(cfg)
    before = {n: p.detach().clone() for n, p in trainer.module.named_parameters()}
    trainer.run()
    changed = {n for n, p in trainer.module.named_parameters() if not torch.equal(p, before[n])}
    out["changed"] = sorted(changed)
    out["names"] = sorted(before)
    out["trainable"] = sorted(n for n, p in trainer.module.named_parameters() if p.requires_grad)
    trainer.module.eval()
    out["trained"] = embed_texts(trainer.module, trainer.tokenizer, PROBE)
    # --finetune from the LoRA checkpoint: its adapters, a new optimizer, step 1 again
    out["base_step1"] = trainer.logger.losses[0][1]
    out["finetuned_step1"] = Trainer(_cfg(model, train_iters=1, load=save, finetune=True)).run()["losses"][0][1]
    return out


def _cli(*args):
    r = _megaemb(*args)
    assert r.returncode == 0, r.stderr[-3000:]


def _hf_embed(model, texts, tokenizer_dir):
    """transformers + last-token pooling (left padding); the exported tokenizer appends the
    end token itself."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    batch = tok(texts, return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        h = model.eval()(**batch).last_hidden_state[:, -1]
    return torch.nn.functional.normalize(h, dim=-1).numpy()


@pytest.mark.timeout(600)
def test_lora_forward_training_checkpoint_and_exports(tiny_models, tmp_path):
    from peft import PeftModel
    from transformers import AutoModel

    base = tiny_models["dense"]
    save = str(tmp_path / "lora")
    out = run_distributed(_one_rank, 1, base, save, timeout=400)[0]
    assert out["forward_vs_merged_cos"] >= 0.99999, out["forward_vs_merged_cos"]
    assert out["adapted"] == 16  # 4 layers x qkv, proj, fc1, fc2
    # only adapters train, and every adapter moved
    assert out["trainable"] == [n for n in out["names"] if ".lora_" in n] and len(out["trainable"]) == 32
    assert out["changed"] == out["trainable"], out["changed"]
    assert abs(out["finetuned_step1"] - out["base_step1"]) > 1e-3, out  # starts from the trained adapters
    # the checkpoint holds adapters and a reference to the base, not base weights
    from megaemb import checkpoint

    meta = checkpoint.read_lora(save)
    assert meta["base"] == os.path.abspath(base) and meta["lora"]["rank"] == 8
    ckpt_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(save, "iter_0000003"))
                     for f in fs)
    assert ckpt_bytes < 2_000_000, ckpt_bytes  # the frozen base alone is 40 MB
    # exports: merged HF weights, and a PEFT adapter folder; the LoRA checkpoint embeds directly
    _cli("export", "--mcore_model", save, "--to_hf", "true", "--output_dir", str(tmp_path / "merged"),
         "--merge_lora", "true")
    _cli("export", "--mcore_model", save, "--to_hf", "true", "--output_dir", str(tmp_path / "adapter"))
    assert sorted(os.listdir(tmp_path / "adapter"))[:2] == ["adapter_config.json", "adapter_model.safetensors"]
    tok = str(tmp_path / "merged")
    merged = _hf_embed(AutoModel.from_pretrained(tok), PROBE, tok)
    plain = _hf_embed(AutoModel.from_pretrained(base), PROBE, tok)
    peft = _hf_embed(PeftModel.from_pretrained(AutoModel.from_pretrained(base), str(tmp_path / "adapter")),
                     PROBE, tok)
    texts = tmp_path / "probe.txt"
    texts.write_text("\n".join(PROBE) + "\n")
    _cli("embed", "--model", save, "--input", str(texts), "--output", str(tmp_path / "direct.npy"))
    direct = np.load(tmp_path / "direct.npy")
    diffs = {"merged_vs_base": float(abs(merged - plain).max()),
             "merged_vs_peft": float(abs(merged - peft).max()),
             "merged_vs_trainer": float(abs(merged - out["trained"]).max()),
             "merged_vs_embed_cli": float(abs(merged - direct).max())}
    print("LoRA export differences:", diffs)
    assert diffs["merged_vs_base"] > 1e-3, diffs  # the merge is not the base model
    assert diffs["merged_vs_peft"] <= 1e-5 and diffs["merged_vs_trainer"] <= 1e-5, diffs
    assert diffs["merged_vs_embed_cli"] <= 1e-5, diffs


# ------------------------------------------------------------------------------ layouts, resume

EXPERTS = ["all-linear", "experts"]


def _reference(rank, world, models, save, moe_save):
    from megaemb.train import Trainer

    full = _steps(_cfg(models["dense"], train_iters=4))
    saved = Trainer(_cfg(models["dense"], train_iters=4, save=save, save_interval=2)).run()["losses"]
    moe = Trainer(_cfg(models["moe"], train_iters=3, target_modules=EXPERTS, save=moe_save,
                       save_interval=3, micro_batch_size=4)).run()["losses"]
    return full, saved, moe


_LAYOUTS = [("tp2", dict(tensor_model_parallel_size=2)),
            ("tp2-sp", dict(tensor_model_parallel_size=2, sequence_parallel=True)),
            ("pp2", dict(pipeline_model_parallel_size=2))]


def _layouts(rank, world, models, save, resumed):
    from megaemb.train import Trainer

    model = models["dense"]
    out = {label: _steps(_cfg(model, train_iters=4, **kw)) for label, kw in _LAYOUTS}
    # experts adapted too, EP=2 (DP=2: one micro-batch of 2 a rank = the reference's one of 4)
    out["moe/ep2"] = Trainer(_cfg(models["moe"], train_iters=3, target_modules=EXPERTS,
                                  expert_model_parallel_size=2)).run()["losses"]
    # resume the world-1 LoRA checkpoint (step 2) under TP=2: steps 3-4 continue its run
    import shutil

    if rank == 0:  # as if killed after the step-2 save
        from megaemb import checkpoint

        shutil.copytree(save, resumed)
        shutil.rmtree(os.path.join(resumed, "iter_0000004"))
        checkpoint.write_atomic(os.path.join(resumed, checkpoint.TRACKER), "2")
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
    out["resumed-tp2"] = Trainer(_cfg(model, train_iters=4, save=resumed, tensor_model_parallel_size=2,
                                      save_interval=0)).run()["losses"]
    return out


@pytest.mark.timeout(800)
def test_lora_layouts_and_resume_equal_one_rank(tiny_models, tmp_path):
    """TP=2, TP=2+SP, PP=2 and (experts adapted) EP=2 equal one rank; a LoRA checkpoint
    resumes under TP=2; a MoE LoRA checkpoint exports merged (its experts' adapters too) and
    refuses a PEFT export, which transformers' fused experts could not load."""
    save, moe_save = str(tmp_path / "ref"), str(tmp_path / "moe")
    ref, saved, moe = run_distributed(_reference, 1, tiny_models, save, moe_save, timeout=400)[0]
    got = run_distributed(_layouts, 2, tiny_models, save, str(tmp_path / "resumed"), timeout=500)[0]
    diffs = {label: _close(got[label], ref) for label, _ in _LAYOUTS}
    diffs["saved-run"] = _close(saved, [r[:2] for r in ref])
    diffs["resumed-tp2"] = _close(got["resumed-tp2"], saved[2:])
    diffs["moe/ep2"] = _close(got["moe/ep2"], moe)
    merged = str(tmp_path / "moe_merged")
    _cli("export", "--mcore_model", moe_save, "--to_hf", "true", "--output_dir", merged, "--merge_lora", "true")
    texts = tmp_path / "probe.txt"
    texts.write_text("\n".join(PROBE) + "\n")
    vectors = {}
    for name, path in (("merged", merged), ("lora", moe_save), ("base", tiny_models["moe"])):
        _cli("embed", "--model", path, "--input", str(texts), "--output", str(tmp_path / f"{name}.npy"))
        vectors[name] = np.load(tmp_path / f"{name}.npy")
    diffs["moe merged vs lora checkpoint"] = float(abs(vectors["merged"] - vectors["lora"]).max())
    moved = float(abs(vectors["merged"] - vectors["base"]).max())
    peft = _megaemb("export", "--mcore_model", moe_save, "--to_hf", "true", "--output_dir",
                    str(tmp_path / "moe_adapter"))
    assert peft.returncode == 2 and "--merge_lora true" in peft.stderr, peft.stderr[-2000:]
    print("LoRA layout differences:", {k: f"{v:.1e}" for k, v in diffs.items()})
    assert abs(ref[0][1] - ref[3][1]) > 1e-3 and moved > 1e-3, moved  # it trains
    assert all(v <= TOL for v in diffs.values()), (diffs, got, ref)


# ------------------------------------------------------------------------------ learning

def _learn(rank, world, model):
    """test_learning's run (debian-desc slice, 16 groups a step), as LoRA: the embedding
    table and norms stay random, only the adapters learn."""
    from megaemb.config import SFTConfig
    from megaemb.train import Trainer

    cfg = SFTConfig(model=model, dataset=[f"{DATA}#1200"], val_dataset=[DEV], eval_limit=200,
                    max_length=64, micro_batch_size=16, global_batch_size=16, train_iters=120,
                    lr=1e-3, lr_decay_style="constant", weight_decay=0.0, infonce_temperature=0.05,
                    log_interval=40, seed=42, train_type="lora", lora_rank=16, lora_alpha=32.0)
    history = Trainer(cfg).run()
    return history["eval_before"], history["eval_after"]


@pytest.mark.timeout(600)
def test_lora_raises_dev_recall(tiny_models):
    before, after = run_distributed(_learn, 1, tiny_models["dense"], timeout=540)[0]
    print(f"LoRA dev recall@10 {before['recall@10']:.3f} -> {after['recall@10']:.3f}")
    assert after["recall@10"] >= before["recall@10"] + 0.1, (before, after)  # measured 0.14 -> 0.34


# ------------------------------------------------------------------------------ base fingerprint

def _flip(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 1]))


@pytest.mark.timeout(60)
def test_weights_fingerprint_follows_the_weights_not_the_folder(tiny_models, tmp_path):
    """Copies (new paths, new mtimes) keep the fingerprint; one changed byte at the start of
    the smallest tensor (the final norm) changes it, and so does a byte of a checkpoint file."""
    import json
    import shutil

    from megaemb.checkpoint import weights_fingerprint

    base = tiny_models["dense"]
    copy = shutil.copytree(base, tmp_path / "copy", copy_function=shutil.copyfile)
    assert weights_fingerprint(str(copy)) == weights_fingerprint(base)
    st = str(copy / "model.safetensors")
    with open(st, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    name = min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1]
               - header[k]["data_offsets"][0])
    _flip(st, 8 + n + header[name]["data_offsets"][0])
    assert weights_fingerprint(str(copy)) != weights_fingerprint(base), name
    # a megaemb checkpoint's iteration files: sampled at evenly spaced places
    ckpt = tmp_path / "ckpt"
    (ckpt / "iter_0000001").mkdir(parents=True)
    (ckpt / "megaemb.json").write_text("{}")
    (ckpt / "latest_checkpointed_iteration.txt").write_text("1")
    (ckpt / "iter_0000001" / "__0_0.distcp").write_bytes(os.urandom(1 << 20))
    before = weights_fingerprint(str(ckpt))
    _flip(str(ckpt / "iter_0000001" / "__0_0.distcp"), (1 << 20) // 2)
    assert weights_fingerprint(str(ckpt)) != before


@pytest.mark.timeout(600)
def test_changed_lora_base_is_refused_unless_allowed(tiny_models, tmp_path):
    """A LoRA checkpoint records its base's fingerprint; a base folder now holding other
    weights (a new revision in the same place) is refused with one line by embed, export and
    sft (resume and --finetune) unless --allow_changed_base true (it used to give vectors at
    cosine -0.10 to the trained model's without a word); the restored base passes again."""
    import shutil

    from megaemb.tiny import make_tiny_checkpoint
    from test_inputs import megaemb, one_error

    base = shutil.copytree(tiny_models["dense"], tmp_path / "base")
    lora = str(tmp_path / "lora")
    train = ["--model", str(base), "--train_type", "lora", "--dataset", f"{DATA}#16", "--max_length", "32",
             "--micro_batch_size", "2", "--global_batch_size", "4", "--lr", "1e-3"]
    r = megaemb("sft", *train, "--train_iters", "1", "--save", lora, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    from megaemb import checkpoint

    assert checkpoint.read_lora(lora)["base_fingerprint"] == checkpoint.weights_fingerprint(str(base))
    original = tmp_path / "original.safetensors"
    shutil.copyfile(base / "model.safetensors", original)
    other = make_tiny_checkpoint(str(tmp_path / "revision"), seed=9)  # same shape, other weights
    shutil.copyfile(os.path.join(other, "model.safetensors"), base / "model.safetensors")
    texts = tmp_path / "t.txt"
    texts.write_text("hello\n")
    embed = ["embed", "--model", lora, "--input", str(texts), "--output", str(tmp_path / "e.npy")]
    why = ("holds other weights than its adapters were trained on", "--allow_changed_base true")
    one_error(megaemb(*embed), "embed", f"--model {lora}: the base model {base}", *why)
    for merge in ("true", "false"):
        one_error(megaemb("export", "--mcore_model", lora, "--to_hf", "true", "--output_dir",
                          str(tmp_path / "hf"), "--merge_lora", merge), "export", *why)
    one_error(megaemb("sft", *train, "--train_iters", "2", "--save", lora), "sft", f"--load {lora}", *why)
    one_error(megaemb("sft", *train, "--train_iters", "1", "--load", lora, "--finetune", "true",
                      "--save", str(tmp_path / "tuned")), "sft", *why)
    assert not os.path.exists(tmp_path / "e.npy") and not os.path.exists(tmp_path / "hf")
    r = megaemb(*embed, "--allow_changed_base", "true")
    assert r.returncode == 0 and np.load(tmp_path / "e.npy").shape[0] == 1, r.stderr[-3000:]
    shutil.copyfile(original, base / "model.safetensors")  # the trained-on weights are back
    r = megaemb("export", "--mcore_model", lora, "--to_hf", "true", "--output_dir", str(tmp_path / "hf"))
    assert r.returncode == 0, r.stderr[-3000:]
