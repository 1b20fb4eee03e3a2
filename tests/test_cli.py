"""End to end through the ``megaemb`` command: export both ways, embed, sentence-transformers."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

TEXTS = ["jq - lightweight and flexible command-line JSON processor",
         "Megatron-Core splits each layer across GPUs.", "x"]


def megaemb(*args, nproc=1, timeout=300):
    env = dict(os.environ, NPROC_PER_NODE=str(nproc), PYTHONWARNINGS="ignore",
               MASTER_PORT=str(29500 + os.getpid() % 1000))
    env.pop("LOCAL_RANK", None)
    return subprocess.run([sys.executable, "-m", "megaemb.cli", *args], capture_output=True,
                          text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def exported(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    mcore, hf = str(root / "mcore"), str(root / "hf")
    r1 = megaemb("export", "--model", tiny_models["dense"], "--to_mcore", "true", "--output_dir", mcore,
                 "--tensor_model_parallel_size", "2", "--test_convert_precision", "true", nproc=2)
    r2 = megaemb("export", "--mcore_model", mcore, "--to_hf", "true", "--output_dir", hf,
                 "--max_shard_size", "20MB")
    (root / "texts.txt").write_text("\n".join(TEXTS) + "\n")
    return root, mcore, hf, r1, r2


@pytest.mark.timeout(600)
def test_export_prints_precision(exported):
    _, mcore, _, r1, r2 = exported
    assert r1.returncode == 0, r1.stderr[-3000:]
    assert r2.returncode == 0, r2.stderr[-3000:]
    line = next(l for l in r1.stdout.splitlines() if l.startswith("test_convert_precision"))
    assert float(line.split("min_cosine=")[1]) >= 0.99999
    assert sorted(os.listdir(mcore)) == ["hf", "iter_0000000", "latest_checkpointed_iteration.txt",
                                         "megaemb-export.json", "megaemb.json"]
    assert not os.path.exists(mcore + ".lock")  # released by the launcher at the end


@pytest.mark.timeout(600)
def test_hf_export_is_sharded_and_loads(exported, tiny_models):
    _, _, hf, _, _ = exported
    index = json.load(open(os.path.join(hf, "model.safetensors.index.json")))
    assert len(set(index["weight_map"].values())) >= 2  # 39 MB embedding + rest over 20 MB shards
    for shard in set(index["weight_map"].values()):  # readable by others, like every other file
        assert os.stat(os.path.join(hf, shard)).st_mode & 0o044 == 0o044
    from transformers import AutoModel

    ours = AutoModel.from_pretrained(hf).state_dict()
    ref = AutoModel.from_pretrained(tiny_models["dense"]).state_dict()
    assert all(torch.equal(ref[k], ours[k]) for k in ref)


@pytest.mark.timeout(600)
def test_embed_matches_sentence_transformers(exported):
    root, mcore, hf, _, _ = exported
    out = str(root / "emb.bin")  # written as exactly this path (no .npy appended), .npy format
    before = set(os.listdir(root))
    r = megaemb("embed", "--model", mcore, "--input", str(root / "texts.txt"), "--output", out,
                "--pipeline_model_parallel_size", "2", "--batch_size", "2", nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert set(os.listdir(root)) - before == {"emb.bin"}
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(hf, device="cpu")
    ref = st.encode(TEXTS, convert_to_numpy=True)
    ours = np.load(out)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() < 1e-5
    # the prompt from config_sentence_transformers.json == megaemb's --instruction format
    q = st.encode(["jq"], prompt_name="query")
    r = megaemb("embed", "--model", hf, "--input", str(root / "texts.txt"), "--output", out,
                "--instruction", "Given a web search query, retrieve relevant passages that answer the query",
                "--overwrite", "true")
    assert r.returncode == 0, r.stderr[-3000:]
    (root / "q.txt").write_text("jq\n")
    r = megaemb("embed", "--model", hf, "--input", str(root / "q.txt"), "--output", out,
                "--instruction", "Given a web search query, retrieve relevant passages that answer the query",
                "--overwrite", "true")
    assert np.abs(np.load(out) - q).max() < 1e-5


@pytest.mark.timeout(600)
def test_export_matches_transformers_both_paddings_and_carries_vllm_config(exported):
    """The exported HF model in transformers (``AutoModel`` + last-token pooling, the model
    card's way) gives megaemb's vectors with left and with right padding; it declares what
    vLLM's pooling runner reads (``vllm serve DIR --runner pooling``): the official
    Qwen3-Embedding architecture, last-token pooling + Normalize modules, a tokenizer that
    appends the end token, no lm_head."""
    root, mcore, hf, _, _ = exported
    out = str(root / "ref.npy")
    r = megaemb("embed", "--model", mcore, "--input", str(root / "texts.txt"), "--output", out,
                "--overwrite", "true")
    assert r.returncode == 0, r.stderr[-3000:]
    ours = np.load(out)
    from transformers import AutoModel, AutoTokenizer

    model, tok = AutoModel.from_pretrained(hf).eval(), AutoTokenizer.from_pretrained(hf)
    for side in ("left", "right"):
        batch = tok(TEXTS, padding=True, return_tensors="pt", padding_side=side)
        assert (batch["input_ids"][batch["attention_mask"].bool()].reshape(-1) == tok.convert_tokens_to_ids(
            "<|endoftext|>")).sum() >= len(TEXTS)  # the end token is appended
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        last = batch["attention_mask"].sum(1) - 1 if side == "right" else torch.full((len(TEXTS),), -1)
        pooled = hidden[torch.arange(len(TEXTS)), last]
        theirs = torch.nn.functional.normalize(pooled, dim=-1).numpy()
        assert np.abs(theirs - ours).max() < 1e-5, (side, np.abs(theirs - ours).max())
    config = json.load(open(os.path.join(hf, "config.json")))
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["model_type"] == "qwen3"
    modules = json.load(open(os.path.join(hf, "modules.json")))
    assert [m["type"].rsplit(".", 1)[1] for m in modules] == ["Transformer", "Pooling", "Normalize"]
    pooling = json.load(open(os.path.join(hf, "1_Pooling", "config.json")))
    assert pooling["pooling_mode_lasttoken"] and not pooling["pooling_mode_mean_tokens"]
    index = json.load(open(os.path.join(hf, "model.safetensors.index.json")))
    assert not any("lm_head" in k or k.startswith("model.") for k in index["weight_map"])


@pytest.mark.timeout(300)
def test_failed_export_leaves_no_output(tiny_models, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(open(os.path.join(tiny_models["dense"], "config.json")).read())
    out = tmp_path / "out"
    r = megaemb("export", "--model", str(bad), "--to_mcore", "true", "--output_dir", str(out))
    assert r.returncode == 2
    assert "no model.safetensors" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists() and not (tmp_path / "out.tmp").exists()


@pytest.mark.timeout(600)
def test_sft_under_torchrun_saves_and_exports(tiny_models, tmp_path):
    """NPROC_PER_NODE=2 megaemb sft (TP=2 via torchrun), then the HF export of the result."""
    data = os.path.join(os.path.dirname(__file__), "..", "demo", "data")
    out = tmp_path / "run"
    r = megaemb("sft", "--model", tiny_models["dense"], "--dataset", os.path.join(data, "train.jsonl#32"),
                "--val_dataset", os.path.join(data, "dev.jsonl#16"), "--tensor_model_parallel_size", "2",
                "--micro_batch_size", "4", "--global_batch_size", "8", "--train_iters", "2",
                "--max_length", "32", "--log_interval", "1", "--save", str(out), nproc=2, timeout=500)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step 2: loss" in r.stdout and "eval @ step 2: recall@1" in r.stdout
    # every wait for peers says its bound first, once per job
    assert r.stdout.count("the other ranks wait up to 24 h for it") == 1, r.stdout[-3000:]
    assert r.stdout.count("the other ranks wait up to 240 min (--export_timeout_minutes)") == 1
    for name in ("iter_0000002", "hf_model", "tensorboard", "curves.png"):
        assert (out / name).exists(), name
    from sentence_transformers import SentenceTransformer

    emb = SentenceTransformer(str(out / "hf_model"), device="cpu").encode(["jq"])
    assert emb.shape == (1, 64)


def _subparsers() -> dict:
    from megaemb.cli import build_parser

    return next(a for a in build_parser()._actions if a.dest == "command").choices


@pytest.mark.timeout(30)
def test_every_flag_has_help_with_its_default():
    """Every subcommand's flags come from one typed source (SFTConfig, config.*Flags) and their
    field comments: each has help text and shows its default (or that it is required); a new
    undocumented field fails here, and so does reST markup in any help page."""
    import dataclasses

    from megaemb.config import SFTConfig

    subs = _subparsers()
    assert set(subs) == {"export", "embed", "eval", "mine", "serve", "sft"}
    for name, sub in subs.items():
        for action in sub._actions:
            if not action.option_strings or action.dest == "help":
                continue
            text = action.help or ""
            shown = "(default: " in text or text.endswith("(required)")
            assert shown and len(text.rsplit(" (", 1)[0].strip()) > 5, (name, action.option_strings, text)
        assert "`" not in sub.format_help(), name
    from megaemb.cli import build_parser

    assert "`" not in build_parser().format_help()
    actions = {a.option_strings[0][2:]: a for a in subs["sft"]._actions if a.option_strings}
    assert all(f.name in actions for f in dataclasses.fields(SFTConfig))
    assert actions["lr"].help.endswith("(default: 1e-05)")
    assert actions["bf16"].help.endswith("(default: none)") and "CUDA" in actions["bf16"].help
    assert actions["sequence_parallel"].help.endswith("(default: false)")
    serve = {a.dest: a for a in subs["serve"]._actions}
    assert "400" in serve["max_length"].help  # serve documents its own --max_length
    assert serve["port"].help.endswith("(default: 8000)") and serve["model"].help.endswith("(required)")


@pytest.mark.timeout(30)
def test_flag_defaults_and_types_are_unchanged():
    """The generated parsers keep every flag's name, default and type (Megatron-SWIFT names)."""
    from megaemb.cli import build_parser

    parse = build_parser().parse_args
    serve = parse(["serve", "--model", "m"])
    assert (serve.host, serve.port, serve.max_batch_texts, serve.batch_wait_ms, serve.batch_size) == \
        ("127.0.0.1", 8000, 256, 5.0, 32)
    assert (serve.max_length, serve.packing, serve.served_model_name, serve.bf16, serve.seed) == (None, None, None, False, 42)
    mine = parse(["mine", "--model", "m", "--dataset", "a", "b#3", "--output", "o"])
    assert (mine.dataset, mine.num_negatives, mine.range, mine.margin, mine.cache_dir) == (["a", "b#3"], 7, "10-100", 0.95, None)
    export = parse(["export", "--model", "m", "--to_mcore", "true", "--output_dir", "o",
                    "--tensor_model_parallel_size", "2", "--sequence_parallel", "yes"])
    assert (export.to_mcore, export.to_hf, export.max_shard_size, export.iteration) == (True, False, "5GB", None)
    assert (export.tensor_model_parallel_size, export.sequence_parallel, export.attention) == (2, True, "auto")
    ev = parse(["eval", "--model", "m", "--dataset", "d", "--mrl_dims", "16", "64"])
    assert (ev.mrl_dims, ev.output, ev.overwrite, ev.instruction) == ([16, 64], None, False, None)
    embed = parse(["embed", "--model", "m", "--input", "i", "--output", "o"])
    assert (embed.text_field, embed.dim, embed.overwrite) == ("text", None, False)


@pytest.mark.timeout(30)
def test_an_undocumented_flag_is_refused():
    """A field without its comment cannot become a flag: building the parser fails."""
    import argparse
    from dataclasses import dataclass

    from megaemb.cli import add_dataclass_flags

    @dataclass
    class Flags:
        documented: int = 1  # a flag with help
        bare: int = 2

    with pytest.raises(ValueError, match="Flags.bare: no comment documents the flag --bare"):
        add_dataclass_flags(argparse.ArgumentParser(), (Flags,))
