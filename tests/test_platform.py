"""The CPU compatibility layer: each fix cures its symptom, and nothing is touched on CUDA."""
import subprocess
import sys
import textwrap

import pytest
import torch

from megaemb import platform


@pytest.fixture(scope="module", autouse=True)
def applied():
    platform.setup()
    assert platform.is_applied()


@pytest.mark.timeout(60)
def test_backend_and_device():
    assert platform.backend() == "gloo"
    assert platform.device() == torch.device("cpu")


@pytest.mark.timeout(60)
def test_fix1_cuda_calls_point_at_cpu():
    assert torch.cuda.current_device() == "cpu"
    torch.cuda.synchronize()
    with torch.cuda.stream(torch.cuda.Stream()):
        torch.cuda.current_stream().wait_stream(torch.cuda.Stream())
    torch.cuda.Event().record()


@pytest.mark.timeout(60)
def test_fix2_cuda_placements_map_to_cpu():
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.empty(2, device=torch.cuda.current_device()).device.type == "cpu"
    assert torch.ones(2).cuda().device.type == "cpu"
    assert torch.ones(2).to("cuda").device.type == "cpu"
    assert torch.tensor([1.0], device=torch.device("cuda", 0), pin_memory=True).device.type == "cpu"


@pytest.mark.timeout(60)
def test_fix3_type_reports_cuda_names():
    assert torch.ones(1).type() == "torch.cuda.FloatTensor"
    assert torch.ones(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert torch.ones(1).type(torch.float64).dtype == torch.float64  # conversions still work


@pytest.mark.timeout(60)
def test_fix4_rng_tracker_forks_cpu_generator():
    from megatron.core.tensor_parallel import random as mrandom

    tracker = mrandom.get_cuda_rng_tracker()
    tracker.reset()
    tracker.add("a", 123)
    before = torch.get_rng_state()
    with tracker.fork("a"):
        x = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before)  # outer stream untouched
    with tracker.fork("a"):
        y = torch.rand(3)
    assert not torch.equal(x, y)  # the named stream advanced
    assert torch.equal(x, torch.rand(3, generator=torch.Generator().manual_seed(123)))


@pytest.mark.timeout(60)
def test_fix5_jit_fuser_disabled():
    from megatron.core import jit

    assert jit.jit_fuser is jit.noop_decorator


@pytest.mark.timeout(60)
def test_fix6_te_general_gemm_bound():
    from megatron.core.transformer.moe import moe_utils

    assert moe_utils.te_general_gemm is None


@pytest.mark.timeout(60)
def test_fix7_alltoall_splits_are_numpy():
    from megatron.core.transformer.moe import token_dispatcher

    out = token_dispatcher.maybe_move_tensor_to_cpu(torch.tensor([1, 2]), as_numpy=True)
    assert out.tolist() == [1, 2] and not torch.is_tensor(out)


@pytest.mark.timeout(120)
def test_noop_when_cuda_present():
    code = textwrap.dedent("""
        import torch
        torch.cuda.is_available = lambda: True
        orig = torch.cuda.current_device
        from megaemb import platform
        platform.setup()
        assert not platform.is_applied()
        assert torch.cuda.current_device is orig
        assert platform.backend() == "nccl"
        from megatron.core.tensor_parallel import random as r
        assert r.CudaRNGStatesTracker.__name__ == "CudaRNGStatesTracker"
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=100)
    assert out.stdout.strip().endswith("ok"), out.stderr[-2000:]


@pytest.mark.timeout(120)  # the module's fixture imports megatron
def test_fallback_note_once_on_cuda_never_on_cpu(monkeypatch):
    assert platform.fallback_note() is None  # CPU: the fallbacks are the expected path
    monkeypatch.setattr(platform, "has_cuda", lambda: True)
    monkeypatch.setattr(platform, "has_transformer_engine", lambda: False)
    monkeypatch.setattr(platform, "has_apex", lambda: False)
    note = platform.fallback_note()
    assert note.startswith("megaemb: note: Transformer Engine and apex not installed: ") and "\n" not in note
    monkeypatch.setattr(platform, "has_transformer_engine", lambda: True)
    assert platform.fallback_note().startswith("megaemb: note: apex not installed")
    monkeypatch.setattr(platform, "has_apex", lambda: True)
    assert platform.fallback_note() is None


@pytest.mark.timeout(300)
def test_two_ranks_on_cpu_print_no_megatron_fallback_warnings(tiny_models, tmp_path):
    """Every megatron module that lacks TE / apex warned once per rank on every command (8+
    lines per rank); on CPU nothing at all is said now."""
    import os

    texts = tmp_path / "t.txt"
    texts.write_text("one\ntwo\n")
    env = {k: v for k, v in os.environ.items() if k not in
           ("PYTHONWARNINGS", "LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR", "NNODES")}
    r = subprocess.run([sys.executable, "-m", "megaemb.cli", "embed", "--model", tiny_models["dense"],
                        "--input", str(texts), "--output", str(tmp_path / "e.npy"),
                        "--tensor_model_parallel_size", "2"], capture_output=True, text=True,
                       env=dict(env, NPROC_PER_NODE="2"), timeout=250)
    assert r.returncode == 0, r.stderr[-3000:]
    for noise in ("not installed", "Warning", "warnings.warn"):
        assert noise not in r.stderr, r.stderr[-3000:]
