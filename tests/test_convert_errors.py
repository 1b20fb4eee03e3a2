"""Bad checkpoints give one-line errors naming the file/tensor; the table inverts exactly."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from megaemb.convert.hf_to_mcore import ConversionError, HFCheckpoint
from megaemb.convert.mapping import hf_names_for, merge, qwen3_mappings, split
from megaemb.shape import Qwen3Shape


def _copy(src, dst, **config_changes):
    """Copy a checkpoint dir, optionally changing fields of its config.json."""
    shutil.copytree(src, dst)
    if config_changes:
        path = os.path.join(dst, "config.json")
        with open(path) as f:
            cfg = json.load(f)
        cfg.update(config_changes)
        with open(path, "w") as f:
            json.dump(cfg, f)
    return str(dst)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_table_covers_checkpoint_and_inverts(tiny_models, kind):
    ckpt = HFCheckpoint(tiny_models[kind])
    tensors = load_file(os.path.join(tiny_models[kind], "model.safetensors"))
    assert sorted(hf_names_for(ckpt.shape)) == sorted(tensors)
    for rule in qwen3_mappings(ckpt.shape):
        if rule.kind in ("qkv", "gate_up") and rule.applies_to(ckpt.shape, 0):
            names = rule.hf_names(layer=0, expert=0)
            parts = [tensors[n] for n in names]
            back = split(rule.kind, merge(rule.kind, parts, ckpt.shape), ckpt.shape)
            assert all(torch.equal(a, b) for a, b in zip(parts, back))


@pytest.mark.timeout(60)
def test_every_spec_spelling_finds_its_row(tiny_models):
    """Local spec, TE's fused norms and TE's grouped-GEMM experts (``weight{e}``) name the
    same rows, with the same layer / expert indices."""
    from megaemb.convert.mapping import find_mapping

    rows = qwen3_mappings(HFCheckpoint(tiny_models["moe"]).shape)
    for spelling, row, index in [
        ("decoder.layers.2.mlp.experts.linear_fc1.weight3", "local_experts.{expert}.linear_fc1", (2, 3)),
        ("decoder.layers.2.mlp.experts.linear_fc2.weight0", "local_experts.{expert}.linear_fc2", (2, 0)),
        ("decoder.layers.2.mlp.experts.local_experts.1.linear_fc2.weight", "local_experts.{expert}.linear_fc2", (2, 1)),
        ("decoder.layers.1.self_attention.linear_qkv.layer_norm_weight", "input_layernorm", (1,)),
    ]:
        m, found = find_mapping(rows, spelling)
        assert row in m.mcore and tuple(found.values()) == index, (spelling, m.mcore, found)


@pytest.mark.timeout(60)
def test_qkv_interleave_layout(tiny_models):
    shape = HFCheckpoint(tiny_models["dense"]).shape  # 4 heads, 2 groups, head_dim 32
    d, h = shape.head_dim, shape.hidden_size
    q = torch.arange(4 * d)[:, None].float().expand(-1, h)
    k = 1000 + torch.arange(2 * d)[:, None].float().expand(-1, h)
    v = 2000 + torch.arange(2 * d)[:, None].float().expand(-1, h)
    qkv = merge("qkv", [q, k, v], shape)[:, 0]
    # group 0 = q heads 0,1 then k head 0 then v head 0
    assert torch.equal(qkv[: 2 * d], torch.arange(2 * d).float())
    assert torch.equal(qkv[2 * d: 3 * d], 1000 + torch.arange(d).float())
    assert torch.equal(qkv[3 * d: 4 * d], 2000 + torch.arange(d).float())


@pytest.mark.timeout(60)
def test_model_prefix_spelling_loads(tiny_models, tmp_path):
    d = _copy(tiny_models["dense"], tmp_path / "causal")
    path = os.path.join(d, "model.safetensors")
    tensors = {f"model.{k}": v for k, v in load_file(path).items()}
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, path)
    ckpt = HFCheckpoint(d)
    assert ckpt.prefix == "model."
    assert torch.equal(ckpt.read("norm.weight"), tensors["model.norm.weight"])


@pytest.mark.timeout(60)
def test_missing_directory_and_config(tmp_path):
    with pytest.raises(ConversionError, match="no such model directory"):
        HFCheckpoint(str(tmp_path / "nope"))
    with pytest.raises(ConversionError, match=r"config.json: missing"):
        HFCheckpoint(str(tmp_path))


@pytest.mark.timeout(60)
def test_unknown_architecture(tiny_models, tmp_path):
    d = _copy(tiny_models["dense"], tmp_path / "llama", model_type="llama")
    with pytest.raises(ValueError, match="model_type 'llama' is not supported"):
        HFCheckpoint(d)


@pytest.mark.timeout(60)
def test_missing_tensor(tiny_models, tmp_path):
    d = _copy(tiny_models["dense"], tmp_path / "missing")
    path = os.path.join(d, "model.safetensors")
    tensors = load_file(path)
    del tensors["layers.2.mlp.up_proj.weight"]
    save_file(tensors, path)
    with pytest.raises(ConversionError, match="layers.2.mlp.up_proj.weight"):
        HFCheckpoint(d)


@pytest.mark.timeout(60)
def test_truncated_safetensors(tiny_models, tmp_path):
    d = _copy(tiny_models["dense"], tmp_path / "trunc")
    path = os.path.join(d, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(ConversionError, match="model.safetensors: truncated safetensors file"):
        HFCheckpoint(d)


@pytest.mark.timeout(60)
def test_shape_mismatch_is_named(tiny_models, tmp_path):
    """A config that disagrees with the weights fails naming the tensor, not deep in torch."""
    from megaemb.config import ParallelConfig
    from megaemb.convert.load import load_model
    from megaemb.parallel import destroy_parallel, init_parallel

    d = _copy(tiny_models["dense"], tmp_path / "shape", intermediate_size=96)
    init_parallel(ParallelConfig())
    try:
        with pytest.raises(ConversionError, match=r"layers.0.mlp.gate_proj.weight\+layers.0.mlp.up_proj.weight gives shape"):
            load_model(d, ParallelConfig())
    finally:
        destroy_parallel()


@pytest.mark.timeout(60)
def test_moe_config_variants():
    base = dict(model_type="qwen3_moe", vocab_size=10, hidden_size=8, num_hidden_layers=4,
                num_attention_heads=2, intermediate_size=16, num_local_experts=4,
                num_experts_per_tok=2, moe_intermediate_size=4, mlp_only_layers=[1])
    shape = Qwen3Shape.from_hf(base)
    assert shape.num_experts == 4 and shape.moe_layer_pattern == (1, 0, 1, 1)
    assert shape.head_dim == 4 and shape.padded_vocab_size == 128
    with pytest.raises(ValueError, match="missing field 'hidden_size'"):
        Qwen3Shape.from_hf({k: v for k, v in base.items() if k != "hidden_size"})


def _convert_imports() -> dict[str, set[str]]:
    """``megaemb.convert`` module -> the ``megaemb.convert`` modules it imports, at any depth of
    its code (function-level imports included: they only postpone a circle to run time)."""
    import ast
    import pathlib

    import megaemb.convert

    graph = {}
    for path in pathlib.Path(megaemb.convert.__path__[0]).glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
        graph[path.stem] = {n.split(".")[2] for n in names
                            if n.startswith("megaemb.convert.") and n.count(".") == 2}
    return graph


@pytest.mark.timeout(30)
def test_convert_modules_import_no_circle():
    """``convert.adapters`` and ``convert.mcore_to_hf`` once imported each other; both now read
    checkpoints through ``convert.mcore_read``. No ``megaemb.convert`` module reaches itself."""
    graph = _convert_imports()
    assert "mcore_read" in graph["adapters"] and "mcore_read" in graph["mcore_to_hf"], graph
    assert "mcore_to_hf" not in graph["adapters"], graph["adapters"]

    def reach(start):
        seen, todo = set(), list(graph[start])
        while todo:
            name = todo.pop()
            if name not in seen:
                seen.add(name)
                todo.extend(graph.get(name, ()))
        return seen
    circles = [name for name in graph if name in reach(name)]
    assert not circles, {name: graph[name] for name in circles}
