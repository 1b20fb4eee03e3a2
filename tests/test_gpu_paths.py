"""GPU code paths proven on CPU (issue 18): RNG states kept as ``torch.Generator``s, pooling
under sequence parallelism, the loss in true fp32, fusions and batch transfer settings,
version report. Fakes cite the megatron / TE source they mirror."""
import contextlib

import pytest
import torch

from megaemb import platform


@pytest.fixture(scope="module", autouse=True)
def applied():
    platform.setup()


# ---------------------------------------------------------------- item 3: Generator RNG states

class GraphSafeTracker:
    """megatron-core 0.16.1 ``CudaRNGStatesTracker(use_cudagraphable_rng=True)`` on the CPU
    generator (``tensor_parallel/random.py``): ``add`` keeps ``default_generator.clone_state()``
    re-seeded (228-231; TE's tracker does the same where graph-safe RNG is available); ``fork``
    makes the default generator draw from the stored Generator (``graphsafe_set_state``, 255)
    and stores back ``graphsafe_get_state()`` (273), i.e. the stored Generator is advanced in
    place. CPU generators have no ``graphsafe_*``, so the fake copies state in and out of the
    stored Generator, which keeps that in-place advance."""

    def __init__(self):
        self.states_ = {}

    def add(self, name, seed):
        state = torch.default_generator.clone_state()
        state.manual_seed(seed)
        self.states_[name] = state

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self.states_ = states

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name].get_state())
        try:
            yield
        finally:
            self.states_[name].set_state(torch.get_rng_state())  # advanced in place
            torch.set_rng_state(outer)


@pytest.fixture
def tracker(monkeypatch):
    from megatron.core.tensor_parallel import random as mrandom

    fake = GraphSafeTracker()
    fake.add("model-parallel-rng", 7)
    monkeypatch.setattr(mrandom, "_CUDA_RNG_STATE_TRACKER", fake)
    return fake


def _draw(tracker):
    with tracker.fork():
        return torch.rand(4)


@pytest.mark.timeout(60)
def test_generator_states_replay(tracker):
    from megaemb.parallel import rng_states, set_rng_states

    start = rng_states()
    first = _draw(tracker)
    assert not torch.equal(_draw(tracker), first)  # the stream moved on
    set_rng_states(start)
    assert torch.equal(_draw(tracker), first)  # the snapshot was a copy, not the live state
    set_rng_states(start)  # set_rng_states copied in: the snapshot replays again
    assert torch.equal(_draw(tracker), first)
    assert isinstance(tracker.states_["model-parallel-rng"], torch.Generator)


@pytest.mark.timeout(60)
def test_checkpointed_states_cross_tracker_kinds(tracker):
    """A checkpoint keeps tensors: saved from a Generator tracker, they restore into one
    (as Generators) and into megatron's tensor tracker (as tensors), and replay both."""
    from megatron.core.tensor_parallel import random as mrandom

    from megaemb.parallel import rng_state_tensor, rng_states, set_rng_states

    saved = rng_states()
    saved["tracker"] = {k: rng_state_tensor(v) for k, v in saved["tracker"].items()}
    assert all(torch.is_tensor(v) for v in saved["tracker"].values())
    first = _draw(tracker)
    set_rng_states(saved)
    assert isinstance(tracker.states_["model-parallel-rng"], torch.Generator)
    assert torch.equal(_draw(tracker), first)

    plain = mrandom.CudaRNGStatesTracker()  # the CPU tracker (platform fix 4): tensor states
    plain.add("model-parallel-rng", 99)
    mrandom._CUDA_RNG_STATE_TRACKER = plain
    set_rng_states(saved)
    assert torch.is_tensor(plain.states_["model-parallel-rng"])
    assert torch.equal(_draw(plain), first)


# ---------------------------------------------------------------- item 10: no TF32 in the loss

@pytest.mark.timeout(60)
def test_cuda_setup_keeps_fp32_matmuls_exact(monkeypatch):
    """On CUDA, ``setup`` leaves fp32 matmuls (similarities, InfoNCE logits) in IEEE fp32 and
    clears NVIDIA's container override that would force TF32 (read once by torch, at the first
    cuBLAS matmul)."""
    monkeypatch.setattr(platform, "has_cuda", lambda: True)
    monkeypatch.setattr(platform, "_APPLIED", False)
    monkeypatch.setenv("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "1")
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # TF32, as a user script or library might leave it
    try:
        platform.setup()
        assert torch.get_float32_matmul_precision() == "highest"
        assert not torch.backends.cuda.matmul.allow_tf32
        assert platform.os.environ["TORCH_ALLOW_TF32_CUBLAS_OVERRIDE"] == "0"
    finally:
        torch.set_float32_matmul_precision(before)


# ---------------------------------------------------------------- item 9: pooling under SP

def _sp_pool_rank(rank, world):
    import torch.distributed as dist

    from megaemb.config import ParallelConfig
    from megaemb.model.pooling import last_token_pool, sequence_parallel_pool
    from megaemb.parallel import init_parallel

    init_parallel(ParallelConfig(tensor_model_parallel_size=world, sequence_parallel=True))
    s, b, h = 8, 3, 5
    full = torch.randn(s, b, h, generator=torch.Generator().manual_seed(0), requires_grad=True)
    pool_index = torch.tensor([23, 0, 7, 14, 12])  # flat s-major: position * b + row
    weight = torch.randn(len(pool_index), h, generator=torch.Generator().manual_seed(1))
    (last_token_pool(full, pool_index) * weight).sum().backward()

    local = full.detach()[rank * s // world:(rank + 1) * s // world].clone().requires_grad_(True)
    moved, real = [], dist.all_reduce
    dist.all_reduce = lambda t, *a, **k: (moved.append(t.numel()), real(t, *a, **k))[1]
    try:
        pooled = sequence_parallel_pool(local, pool_index)
    finally:
        dist.all_reduce = real
    (pooled * weight).sum().backward()
    mine = full.grad[rank * s // world:(rank + 1) * s // world]
    return (torch.equal(pooled, last_token_pool(full.detach(), pool_index)),
            torch.equal(local.grad, mine), moved)


@pytest.mark.timeout(120)
def test_sequence_parallel_pooling_moves_only_the_pooled_rows():
    """TP=2 + SP: each rank pools the rows it holds; the result and each rank's gradient
    equal pooling the gathered sequence, and the one collective moves ``[n, h]``."""
    from distributed import run_distributed

    for equal, grad_equal, moved in run_distributed(_sp_pool_rank, 2, timeout=100):
        assert equal and grad_equal
        assert moved == [5 * 5]  # n x h, not s x b x h
