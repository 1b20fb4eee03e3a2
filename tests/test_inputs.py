"""Inputs a tired user gets wrong: every one ends in one line ``megaemb <cmd>: error: ...``,
exit code 2, before any model loads (no rank starts), with nothing written or destroyed.

Shipped configs: every YAML in ``configs/`` loads with its values coerced to the fields' types
(PyYAML reads ``6e-6`` as a string) and validates.
"""
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "demo", "data", "train.jsonl")
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))


def megaemb(*args, env=None, timeout=120):
    full = dict(os.environ, PYTHONWARNINGS="ignore")
    for k in ("NPROC_PER_NODE", "LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT", "NNODES"):
        full.pop(k, None)
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "megaemb.cli", *args], capture_output=True,
                          text=True, env=full, timeout=timeout, cwd=ROOT)


def one_error(r, command: str, *fragments: str) -> str:
    """The run failed with exit 2 and exactly one error line containing ``fragments``."""
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [l for l in r.stderr.splitlines() if "error:" in l]
    assert len(lines) == 1, r.stderr[-3000:]
    assert lines[0].startswith(f"megaemb {command}: error:") or lines[0].startswith("megaemb"), lines
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


# ------------------------------------------------------------------------------ configs

def _parse(argv):
    from megaemb.cli import build_parser, sft_config

    return sft_config(build_parser().parse_args(argv))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_shipped_configs_load_typed_and_validate(path):
    cfg = _parse(["sft", "--config", path, "--model", "m", "--dataset", "d.jsonl"])
    assert isinstance(cfg.lr, float) and cfg.lr > 0
    assert isinstance(cfg.min_lr, float) and cfg.min_lr <= cfg.lr
    cfg.validate()
    if cfg.bf16:  # GPU configs: micro-batches of >= 16k tokens (smaller ones are launch-bound)
        assert cfg.max_tokens_per_micro_batch >= 16384, path


def test_yaml_values_are_coerced_or_named(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("lr: 6e-6\nmicro_batch_size: '4'\nbf16: 'true'\ndataset: a.jsonl\nmrl_dims: [64, '128']\n")
    cfg = _parse(["sft", "--config", str(good), "--model", "m"])
    assert (cfg.lr, cfg.micro_batch_size, cfg.bf16, cfg.dataset, cfg.mrl_dims) == \
        (6e-6, 4, True, ["a.jsonl"], [64, 128])
    # flags override the YAML; a flag for the run length replaces the YAML's other one
    assert _parse(["sft", "--config", str(good), "--model", "m", "--lr", "1e-3"]).lr == 1e-3
    eight_b = os.path.join(ROOT, "configs", "qwen3-embedding-8B.yaml")
    cfg = _parse(["sft", "--config", eight_b, "--model", "m", "--dataset", "d", "--train_iters", "2"])
    assert (cfg.train_iters, cfg.num_train_epochs) == (2, 0.0)
    cfg.validate()
    cases = {"lr: abc\n": "lr: expected a number", "micro_batch_size: 2.5\n": "micro_batch_size: expected an integer",
             "bf16: maybe\n": "bf16: expected true or false", "lr: [1, 2]\n": "lr: expected a number",
             "train_iter: 3\n": "unknown keys ['train_iter']", "- lr\n- 1\n": "expected a mapping",
             "lr: [1e-5\n": "not valid YAML at line"}
    for i, (text, message) in enumerate(cases.items()):
        path = tmp_path / f"bad{i}.yaml"
        path.write_text(text)
        with pytest.raises(ValueError, match=None) as e:
            _parse(["sft", "--config", str(path), "--model", "m", "--dataset", "d"])
        assert str(path) in str(e.value) and message in str(e.value), (text, str(e.value))


# ------------------------------------------------------------------------------ one line, exit 2

SFT = ["--max_length", "32", "--micro_batch_size", "2", "--global_batch_size", "4",
       "--train_iters", "1"]


@pytest.mark.timeout(300)
def test_flag_mistakes_are_one_line_before_any_load(tiny_models, tmp_path):
    dense = tiny_models["dense"]
    base = ["sft", "--model", dense, "--dataset", DATA]
    cases = [
        (["--micro_batch_size", "0"], "--micro_batch_size must be > 0"),
        (["--lr", "1e-5", "--min_lr", "1e-4"], "--min_lr 0.0001 is above --lr 1e-05"),
        (["--lr_warmup_fraction", "1"], "--lr_warmup_fraction must be in [0, 1)"),
        (["--split_dataset_ratio", "1.5"], "--split_dataset_ratio must be in [0, 1)"),
        (["--infonce_temperature", "0"], "--infonce_temperature must be > 0"),
        (["--loss_type", "infonse"], "--loss_type 'infonse'"),
        (["--lr", "fast"], "expected a number"),
        (["--load", str(tmp_path / "nothing")], "--load"),
        (["--load", dense], "not a megaemb checkpoint"),
        (["--save", dense], "is, holds or lies inside the --model"),
        (["--save", "/etc/hostname/run"], "is not a directory"),
        (["--attention", "flash"], "--attention"),
        (["--mrl_dims", "16", "128"], "--mrl_dims 128 is above the model's hidden size 64"),
        (["--global_batch_size", "5"], "--global_batch_size 5 must be divisible"),
        (["--save", os.path.join(dense, "run")], "lies inside the --model"),
        (["--train_iters", "1.5"], "--train_iters: expected an integer"),
        (["--val_dataset", str(tmp_path / "dev.jsonl#5")], "--val_dataset"),
        (["--train_type", "lora", "--target_modules", "experts"], "has no MoE experts"),
        (["--train_type", "lora", "--lora_rank", "0"], "LoRA needs --lora_rank >= 1"),
        (["--max_tokens_per_micro_batch", "16"], "is below --max_length 32"),
    ]
    for extra, fragment in cases:
        t0 = time.time()
        args = base + SFT + extra
        r = megaemb(*args)
        if "usage:" in r.stderr:  # argparse's own rejection (choices): exit 2, one error line
            assert r.returncode == 2 and fragment in r.stderr.splitlines()[-1], r.stderr
        else:
            one_error(r, "sft", fragment)
        assert time.time() - t0 < 60, extra
        assert "step 1" not in r.stdout
    # an abbreviated flag is an error, not a silent prefix match
    r = megaemb(*base, "--max_length", "32", "--micro_batch_size", "2", "--global_batch_size", "4",
                "--train_iter", "1")
    one_error(r, "sft", "unrecognized arguments: --train_iter")
    r = megaemb(*base, *SFT, env={"NPROC_PER_NODE": "two"})
    one_error(r, "sft", "NPROC_PER_NODE")
    # layouts the model or the process count cannot take: caught before any rank starts
    t0 = time.time()
    one_error(megaemb(*base, *SFT, "--tensor_model_parallel_size", "4", env={"NPROC_PER_NODE": "4"}),
              "sft", "--tensor_model_parallel_size 4 does not divide the model's 2 key/value heads")
    one_error(megaemb(*base, *SFT, "--tensor_model_parallel_size", "2", env={"NPROC_PER_NODE": "3"}),
              "sft", "3 processes are not a multiple of tensor x pipeline x context parallel size "
              "2 x 1 x 1 = 2")
    assert time.time() - t0 < 30


@pytest.mark.timeout(300)
def test_export_and_embed_refuse_to_destroy_inputs(tiny_models, tmp_path):
    dense = tiny_models["dense"]
    mcore = tmp_path / "mcore"
    r = megaemb("export", "--model", dense, "--to_mcore", "true", "--output_dir", str(mcore))
    assert r.returncode == 0, r.stderr[-3000:]
    before = sorted(os.listdir(mcore))
    one_error(megaemb("export", "--mcore_model", str(mcore), "--to_hf", "true", "--output_dir",
                      str(mcore), "--overwrite", "true"), "export", "would destroy the input")
    one_error(megaemb("export", "--mcore_model", str(mcore), "--to_hf", "true", "--output_dir",
                      str(tmp_path), "--overwrite", "true"), "export", "would destroy the input")
    one_error(megaemb("export", "--mcore_model", str(mcore), "--to_hf", "true", "--output_dir",
                      str(mcore / "hf"), "--overwrite", "true"), "export", "part of the checkpoint")
    one_error(megaemb("export", "--model", dense, "--to_mcore", "true", "--output_dir", dense,
                      "--overwrite", "true"), "export", "would destroy the input")
    one_error(megaemb("export", "--model", dense, "--to_mcore", "true", "--output_dir", str(mcore)),
              "export", "exists and is not empty")
    one_error(megaemb("export", "--model", dense, "--to_mcore", "true", "--to_hf", "true",
                      "--output_dir", str(tmp_path / "x")), "export", "exactly one")
    one_error(megaemb("export", "--mcore_model", dense, "--to_hf", "true", "--output_dir",
                      str(tmp_path / "x")), "export", "not a megaemb checkpoint")
    assert sorted(os.listdir(mcore)) == before and os.listdir(dense)
    # --overwrite works for --to_mcore too
    r = megaemb("export", "--model", dense, "--to_mcore", "true", "--output_dir", str(mcore),
                "--overwrite", "true")
    assert r.returncode == 0, r.stderr[-3000:]
    texts = tmp_path / "t.txt"
    texts.write_text("hello\n")
    one_error(megaemb("embed", "--model", dense, "--input", str(texts), "--output", "x.npy",
                      "--batch_size", "0"), "embed", "--batch_size must be >= 1")
    one_error(megaemb("embed", "--model", dense, "--input", str(texts), "--output", str(tmp_path)),
              "embed", "is a directory")
    one_error(megaemb("embed", "--model", dense, "--input", str(texts), "--output",
                      "/etc/hostname/emb.npy"), "embed", "not a directory")
    one_error(megaemb("embed", "--model", str(tmp_path / "none"), "--input", str(texts), "--output",
                      "x.npy"), "embed", "no such directory")
    # embed never writes over its input, the model, a checkpoint, or an existing file unasked
    one_error(megaemb("embed", "--model", dense, "--input", str(texts), "--output", str(texts)),
              "embed", "--input")
    one_error(megaemb("embed", "--model", dense, "--input", str(texts), "--output",
                      os.path.join(dense, "model.safetensors")), "embed", "--model")
    one_error(megaemb("embed", "--model", dense, "--input", str(texts), "--output",
                      str(mcore / "latest_checkpointed_iteration.txt")), "embed", "checkpoint")
    existing = tmp_path / "old.npy"
    existing.write_bytes(b"keep me")
    one_error(megaemb("embed", "--model", dense, "--input", str(texts), "--output", str(existing)),
              "embed", "exists (--overwrite true replaces it)")
    assert existing.read_bytes() == b"keep me" and texts.read_text() == "hello\n"
    # export of an iteration that does not exist
    one_error(megaemb("export", "--mcore_model", str(mcore), "--to_hf", "true", "--output_dir",
                      str(tmp_path / "h"), "--iteration", "5"), "export", "iter_0000005: missing")


def _damage(src, dst, how):
    shutil.copytree(src, dst)
    it = os.path.join(dst, "iter_0000000")
    files = sorted(f for f in os.listdir(it) if f.endswith(".distcp"))
    if how == "truncated":
        path = os.path.join(it, files[0])
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    elif how == "missing_distcp":
        os.remove(os.path.join(it, files[-1]))
    elif how == "missing_metadata":
        os.remove(os.path.join(it, ".metadata"))
    elif how == "bad_tracker":
        open(os.path.join(dst, "latest_checkpointed_iteration.txt"), "w").write("oops")
    return dst


@pytest.mark.timeout(300)
def test_damaged_checkpoint_is_one_line(tiny_models, tmp_path):
    mcore = tmp_path / "mcore"
    r = megaemb("export", "--model", tiny_models["dense"], "--to_mcore", "true", "--output_dir", str(mcore))
    assert r.returncode == 0, r.stderr[-3000:]
    expected = {"truncated": "truncated", "missing_distcp": "missing", "missing_metadata": ".metadata",
                "bad_tracker": "damaged"}
    texts = tmp_path / "t.txt"
    texts.write_text("hello\n")
    for how, fragment in expected.items():
        bad = _damage(str(mcore), str(tmp_path / how), how)
        one_error(megaemb("export", "--mcore_model", bad, "--to_hf", "true", "--output_dir",
                          str(tmp_path / f"{how}_hf")), "export", fragment)
        one_error(megaemb("embed", "--model", bad, "--input", str(texts), "--output",
                          str(tmp_path / "e.npy")), "embed", fragment)
        assert not os.path.exists(tmp_path / f"{how}_hf")


def test_layout_that_cannot_split_the_model_is_named():
    from megaemb.config import ParallelConfig
    from megaemb.shape import Qwen3Shape, check_parallel_layout
    from megaemb.tiny import tiny_config

    dense = Qwen3Shape.from_hf(tiny_config().to_dict())  # 4 heads, 2 KV heads, 4 layers
    moe = Qwen3Shape.from_hf(tiny_config(moe=True).to_dict())  # 4 experts
    check_parallel_layout(dense, ParallelConfig(tensor_model_parallel_size=2), "m")
    for shape, kw, fragment in [
            (dense, dict(tensor_model_parallel_size=4), "--tensor_model_parallel_size 4 does not "
             "divide the model's 2 key/value heads"),
            (dense, dict(pipeline_model_parallel_size=3), "--pipeline_model_parallel_size 3 does not "
             "divide the model's 4 layers"),
            (moe, dict(expert_model_parallel_size=3), "3 does not divide the model's 4 experts"),
            (dense, dict(expert_model_parallel_size=2), "needs a MoE model")]:
        with pytest.raises(ValueError) as e:
            check_parallel_layout(shape, ParallelConfig(**kw), "m")
        assert fragment in str(e.value), str(e.value)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("world, kw, fragment", [
    (2, dict(tensor_model_parallel_size=2, expert_model_parallel_size=2),
     "2 processes are not a multiple of expert tensor (= tensor) x expert x pipeline parallel size "
     "2 x 2 x 1 = 4"),
    (6, dict(expert_model_parallel_size=4), "x expert x pipeline parallel size 1 x 4 x 1 = 4"),
    (4, dict(pipeline_model_parallel_size=2, expert_model_parallel_size=4), "= 8"),
    (3, dict(tensor_model_parallel_size=2), "tensor x pipeline x context parallel size 2 x 1 x 1 = 2"),
])
def test_world_that_megatron_cannot_split_is_named(world, kw, fragment):
    """Every product megatron-core's initialize_model_parallel divides the world by."""
    from megaemb.config import ParallelConfig

    with pytest.raises(ValueError) as e:
        ParallelConfig(**kw).check_world_size(world)
    assert fragment in str(e.value), str(e.value)
    for fits in (8, 16):
        ParallelConfig(**kw).check_world_size(fits)


@pytest.mark.timeout(120)
def test_moe_tp_times_ep_beyond_the_world_is_one_line_before_ranks(tiny_models, tmp_path):
    """The issue's MoE case: TP=2 x EP=2 on 2 processes (two megatron tracebacks before)."""
    t0 = time.time()
    r = megaemb("sft", "--model", tiny_models["moe"], "--dataset", DATA, "--save", str(tmp_path / "o"),
                "--tensor_model_parallel_size", "2", "--expert_model_parallel_size", "2",
                "--sequence_parallel", "true", *SFT, env={"NPROC_PER_NODE": "2"})
    one_error(r, "sft", "2 processes are not a multiple of expert tensor (= tensor) x expert x "
              "pipeline parallel size 2 x 2 x 1 = 4")
    assert time.time() - t0 < 60 and not os.path.exists(tmp_path / "o")


@pytest.mark.timeout(120)
def test_tiny_model_command(tmp_path):
    """``python -m megaemb.tiny``: the README's way to get a model to try megaemb with."""
    run = [sys.executable, "-m", "megaemb.tiny"]
    r = subprocess.run([*run, str(tmp_path / "moe"), "--moe"], capture_output=True, text=True, cwd=ROOT, timeout=100)
    assert r.returncode == 0 and f"to {tmp_path / 'moe'}" in r.stdout, r.stderr[-2000:]
    from megaemb.preflight import model_shape

    assert model_shape(str(tmp_path / "moe")).num_experts == 4
    r = subprocess.run([*run, str(tmp_path / "rr"), "--reranker"], capture_output=True, text=True, cwd=ROOT,
                       timeout=100)
    assert r.returncode == 0 and "reranker (causal LM)" in r.stdout, r.stderr[-2000:]
    from megaemb import tasks
    from megaemb.preflight import model_task

    assert model_task(str(tmp_path / "rr")) is tasks.GENERATIVE_RERANKER  # eval / serve read it so
    assert model_task(str(tmp_path / "moe")) is tasks.EMBEDDING
    r = subprocess.run([*run, str(tmp_path / "moe")], capture_output=True, text=True, cwd=ROOT, timeout=100)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"python -m megaemb.tiny: error: {tmp_path / 'moe'} exists and is not an empty directory "
        "(see python -m megaemb.tiny --help)"], r.stderr


@pytest.mark.timeout(30)
def test_full_disk_is_refused_before_training(tmp_path):
    import dataclasses

    from megaemb import preflight
    from megaemb.shape import Qwen3Shape
    from megaemb.tiny import tiny_config

    tiny = Qwen3Shape.from_hf(tiny_config().to_dict())
    preflight.check_free_space(str(tmp_path / "run"), tiny, False, "--save run")  # a few MB: fits
    # Qwen3-Embedding-8B's shape: ~7.6e9 weights -> ~149 GiB in fp32 (+12 bytes optimizer, +4 export)
    big = dataclasses.replace(tiny, hidden_size=4096, num_layers=36, num_heads=32, num_kv_heads=8,
                              head_dim=128, ffn_hidden_size=12288)
    assert 7.0e9 < big.num_parameters() < 8.0e9
    free = __import__("shutil").disk_usage(tmp_path).free
    if free > big.num_parameters() * 20:
        pytest.skip("this disk has room for an 8B checkpoint")
    with pytest.raises(OSError, match=r"--save run: .* GiB free on .*; a checkpoint and its HF export "
                                      r"need about 1\d\d\.\d GiB"):
        preflight.check_free_space(str(tmp_path / "run" / "deeper"), big, False, "--save run")


@pytest.mark.timeout(30)
def test_small_dev_shm_is_named_with_its_fix(tmp_path):
    from megaemb import platform

    assert platform.shm_problem(str(tmp_path), min_gib=1e9).startswith(f"{tmp_path} holds only ")
    assert "--ipc=host" in platform.shm_problem(str(tmp_path), min_gib=1e9)
    assert platform.shm_problem(str(tmp_path), min_gib=1e-9) is None
    assert platform.shm_problem(str(tmp_path / "missing")) is None


@pytest.mark.timeout(30)
def test_save_total_limit_keeps_the_newest(tmp_path):
    from megaemb import checkpoint
    from megaemb.config import SFTConfig

    for i in (1, 2, 3, 4):
        (tmp_path / f"iter_{i:07d}").mkdir()
        (tmp_path / f"iter_{i:07d}_hf").mkdir()
    (tmp_path / "iter_0000005.tmp").mkdir()  # a save in progress is not a checkpoint
    (tmp_path / "hf_model").mkdir()
    removed = checkpoint.prune_checkpoints(str(tmp_path), 2)
    assert sorted(os.path.basename(p) for p in removed) == \
        ["iter_0000001", "iter_0000001_hf", "iter_0000002", "iter_0000002_hf"]
    assert sorted(os.listdir(tmp_path)) == ["hf_model", "iter_0000003", "iter_0000003_hf",
                                            "iter_0000004", "iter_0000004_hf", "iter_0000005.tmp"]
    assert checkpoint.prune_checkpoints(str(tmp_path), 0) == []
    with pytest.raises(ValueError, match="--save_total_limit"):
        SFTConfig(model="m", dataset=["d"], train_iters=1, save_total_limit=-1).validate()


@pytest.mark.parametrize("flag", ["train_iters", "num_train_epochs"])
def test_negative_length_of_training_is_named(flag):
    """``--train_iters -1`` says the value is negative, not that neither length was given."""
    from megaemb.config import SFTConfig

    with pytest.raises(ValueError, match=f"--{flag} must be >= 0 .* got -1"):
        SFTConfig(model="m", dataset=["d"], **{flag: -1}).validate()


def test_run_stopped_before_its_first_save_restarts(tmp_path):
    """A ``--save`` holding only what a run writes before its first checkpoint (its marker,
    TensorBoard events, curves) is the same command's to start again; anything else stays
    refused."""
    from megaemb import preflight
    from megaemb.config import SFTConfig
    from megaemb.tiny import make_tiny_checkpoint

    model = make_tiny_checkpoint(str(tmp_path / "m"), with_tokenizer=False)
    save = tmp_path / "run"
    (save / "tensorboard").mkdir(parents=True)
    (save / preflight.RUN_MARKER).write_text("x")
    cfg = SFTConfig(model=model, dataset=[DATA], train_iters=1, save=str(save))
    assert preflight.resolve_load(cfg) == ""
    (save / "notes.txt").write_text("mine")  # something megaemb did not write
    with pytest.raises(FileExistsError, match="no megaemb checkpoint"):
        preflight.resolve_load(cfg)
    (save / "notes.txt").unlink()
    (save / preflight.RUN_MARKER).unlink()  # another tool's TensorBoard folder
    with pytest.raises(FileExistsError, match="holds tensorboard"):
        preflight.resolve_load(cfg)


# ------------------------------------------------------------------------ embed --input

@pytest.mark.timeout(60)
def test_embed_reads_the_dataset_formats_by_text_field(tmp_path):
    """``embed --input`` reads what ``sft --dataset`` reads, one text per row's field: a CSV's
    header and a JSON array's brackets are never texts."""
    import datasets

    from megaemb.embed import read_texts

    rows = [{"id": 1, "text": "hello"}, {"id": 2, "text": "world, with comma"}]
    want = ["hello", "world, with comma"]
    (tmp_path / "a.csv").write_text('id,text\n1,hello\n2,"world, with comma"\n')
    (tmp_path / "a.json").write_text(json.dumps(rows, indent=2))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "a.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "folder"))
    for name in ("a.csv", "a.json", "a.jsonl", "a.parquet", "folder"):
        assert read_texts(str(tmp_path / name)) == want, name
    (tmp_path / "t.txt").write_text("one\ntwo, three\n")
    assert read_texts(str(tmp_path / "t.txt")) == ["one", "two, three"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name, content, message", [
    ("a.csv", "id,text\n1,hello\n2,\n", "a.csv row 2: field 'text': missing (null)"),
    ("a.csv", "id,body\n1,hello\n", "a.csv row 1: field 'text': missing"),
    ("a.csv", 'id,text\n1,"two\nlines"\n2,NA\n3,\n', "a.csv row 3: field 'text': missing (null)"),
    ("a.json", '[{"text": "a"},\n {"text": 5}]', "a.json:2: field 'text': expected string, got number"),
    ("a.json", '[{"text": "a"}, {"text": "b"}, {"text": 5}]', "a.json[2]: field 'text': expected string, got number"),
    ("a.jsonl", '{"text": "a"}\n["b"]\n', "a.jsonl:2: expected a JSON object, got list"),
    ("a.tsv", "hello\n", "a.tsv: unsupported file type"),
])
def test_embed_input_errors_name_file_and_line(tmp_path, name, content, message):
    from megaemb.data.formats import DataError
    from megaemb.embed import check_input, read_texts

    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match="^" + re.escape(str(tmp_path / message))):
        read_texts(str(tmp_path / name))
    if name.endswith(".tsv"):  # refused before any model loads
        with pytest.raises(ValueError, match=r"--input .*a.tsv: unsupported file type; expected .txt"):
            check_input(str(tmp_path / name))
    else:
        check_input(str(tmp_path / name))
