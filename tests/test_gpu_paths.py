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


# ---------------------------------------------------------------- item 8: fusions, transfers

@pytest.mark.timeout(60)
@pytest.mark.parametrize("attention, apex", [("sdpa", False), ("sdpa", True), ("te", False)])
def test_cuda_fusions_follow_what_imports(monkeypatch, attention, apex):
    """On CUDA with Transformer Engine importable, TE's fused RoPE, MoE permutation and router
    serve every spec; gradient-accumulation fusion needs TE's linears or apex's kernel."""
    monkeypatch.setattr(platform, "has_cuda", lambda: True)
    monkeypatch.setattr(platform, "has_transformer_engine", lambda: True)
    monkeypatch.setattr(platform, "has_apex_wgrad_fusion", lambda: apex)
    f = platform.fusions(attention)
    assert f["apply_rope_fusion"] and f["moe_permute_fusion"] and f["moe_router_fusion"]
    assert f["gradient_accumulation_fusion"] == (attention == "te" or apex)
    assert f["moe_grouped_gemm"] == (attention == "te")
    monkeypatch.setattr(platform, "has_transformer_engine", lambda: False)
    f = platform.fusions(attention)
    assert not (f["apply_rope_fusion"] or f["moe_permute_fusion"] or f["moe_router_fusion"])


def te_fused_rope(t, freqs, interleaved=False):
    """Transformer Engine's ``fused_apply_rotary_pos_emb`` as megatron calls it for sbhd
    (``megatron/core/models/common/embeddings/rope_utils.py`` 286-287 -> TE
    ``pytorch/attention/rope.py`` ``FusedRoPEFunc``): ``t [s, b, h, d]``, ``freqs [s2, 1, 1,
    d2]`` with ``s2 >= s`` and ``d2 <= d``; rows ``0..s-1`` of freqs rotate positions
    ``0..s-1``. The arithmetic is megatron's unfused sbhd rotation."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    assert t.dim() == 4 and freqs.dim() == 4 and freqs.shape[1:3] == (1, 1), (t.shape, freqs.shape)
    assert freqs.shape[0] >= t.shape[0] and freqs.shape[-1] <= t.shape[-1]
    te_fused_rope.calls += 1
    return _apply_rotary_pos_emb_bshd(t, freqs[:t.shape[0]], rotary_interleaved=interleaved)


@pytest.mark.timeout(180)
def test_fused_rope_takes_the_sdpa_specs_padded_and_packed_batches(tiny_models, monkeypatch):
    """With ``apply_rope_fusion`` (TE imports, SDPA spec) megatron hands RoPE to TE's kernel:
    padded ``[s, b]`` and packed ``[T, 1]`` (per-token frequencies) batches meet its contract
    and give the unfused embeddings."""
    from megatron.core.models.common.embeddings import rope_utils

    from megaemb.config import ParallelConfig
    from megaemb.convert.load import load_model
    from megaemb.data.batching import text_batch
    from megaemb.parallel import init_parallel

    init_parallel(ParallelConfig())
    model = load_model(tiny_models["dense"], ParallelConfig(), attention="sdpa").model.eval()
    seqs = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb", te_fused_rope)
    te_fused_rope.calls = 0
    for packed in (False, True):
        batch = text_batch(seqs, 0, packed=packed)
        with torch.no_grad():
            model.config.apply_rope_fusion = False
            plain = model(batch)
            model.config.apply_rope_fusion = True
            fused = model(batch)
        model.config.apply_rope_fusion = False
        torch.testing.assert_close(fused, plain, rtol=0, atol=1e-6)
    assert te_fused_rope.calls > 0


@pytest.mark.timeout(30)
def test_packed_max_seqlen_is_a_bucket():
    """TE picks its attention backend by ``max_seqlen``: rounded to ``pack_length``'s buckets
    (capped at T), few values recur across micro-batches."""
    from megaemb.data.batching import pack_batch, pack_length

    seen = set()
    for longest in range(1, 300, 7):
        batch = pack_batch([[1] * longest, [2] * 3], pad_id=0)
        assert max(batch.max_seqlen, longest) == batch.max_seqlen <= batch.input_ids.shape[1]
        assert batch.max_seqlen in (pack_length(longest), batch.input_ids.shape[1])
        seen.add(batch.max_seqlen)
    assert seen <= {pack_length(n) for n in range(1, 400)}  # 10 sizes; exact lengths gave 43


@pytest.mark.timeout(30)
def test_step_batches_are_pinned_on_cuda(monkeypatch):
    from megaemb.data.batching import TextBatch
    from megaemb.data.tokenize import TokenizedExample as Example
    from megaemb.step import Layout

    pinned = []
    monkeypatch.setattr(TextBatch, "pin_memory", lambda self: pinned.append(self) or self)
    layout = Layout(pad_id=0, packed=True)
    rows = [Example(query=[1, 2], doc=[3], negatives=[[4]], label=None)] * 4
    layout.batch([[1, 2], [3]])
    layout.micro_batches(rows, 2)
    assert not pinned  # CPU: nothing to pin
    monkeypatch.setattr(platform, "has_cuda", lambda: True)
    out = [layout.batch([[1, 2], [3]])] + [b.texts for b in layout.micro_batches(rows, 2)]
    assert [id(b) for b in pinned] == [id(b) for b in out]


# ---------------------------------------------------------------- item 12: versions, once

@pytest.mark.timeout(60)
def test_versions_are_reported_once_with_range_problems(monkeypatch, capsys):
    found = platform.versions()
    assert found["torch"] == torch.__version__ and found["megatron-core"] == "0.16.1"
    assert {"transformer-engine", "cudnn", "flash-attn", "apex", "triton"} <= set(found)
    # NVIDIA's 25.09 image: TE 2.7, below megatron-core 0.16.1's declared >= 2.9
    old_te = {**found, "transformer-engine": "2.7.0+1c5f2b4"}
    assert platform.version_problems(found) == []
    [problem] = platform.version_problems(old_te)
    assert problem.startswith("transformer-engine 2.7.0+1c5f2b4 is outside megatron-core 0.16.1's range")
    assert platform.version_problems({**found, "transformer-engine": "2.11.0+abc"}) == []

    monkeypatch.setattr(platform, "_REPORTED", False)
    monkeypatch.setattr(platform, "versions", lambda: old_te)
    platform.report_versions()
    platform.report_versions()
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[0].startswith("versions: torch ") and "transformer-engine 2.7.0" in out[0]
    assert out[1].startswith("warning: transformer-engine 2.7.0+1c5f2b4 is outside")


# ---------------------------------------------------------------- item 8: next step built ahead

@pytest.mark.timeout(240)
@pytest.mark.parametrize("global_negatives", [False, True])
def test_next_steps_inputs_are_built_while_a_step_runs(tiny_models, monkeypatch, global_negatives):
    """Step i + 1's rows and micro-batches are built on the helper thread, submitted before step
    i's forward / backward; the losses equal those of inputs built in the step itself."""
    import os
    import threading

    from megaemb.config import SFTConfig
    from megaemb.train import Trainer

    data = os.path.join(os.path.dirname(os.path.dirname(__file__)), "demo", "data", "train.jsonl")
    cfg = SFTConfig(model=tiny_models["dense"], dataset=[f"{data}#32"], max_length=32,
                    micro_batch_size=2, global_batch_size=4, train_iters=3, lr=1e-4, seed=42,
                    global_negatives=global_negatives, log_interval=1)
    events = []
    built = Trainer.step_inputs
    ran = Trainer.forward_backward

    def step_inputs(self, step):
        events.append(("build", step, threading.current_thread().name.startswith("megaemb-next-step")))
        return built(self, step)

    def forward_backward(self, *args):
        submitted = self._ahead is not None and self._ahead[0] == self.step + 1
        events.append(("run", self.step, submitted or self.step + 1 == self.train_iters))
        return ran(self, *args)

    def losses(trainer):
        out = []
        for trainer.step in range(cfg.train_iters):
            out.append(trainer.train_step()["loss"])
        return out

    monkeypatch.setattr(Trainer, "step_inputs", step_inputs)
    monkeypatch.setattr(Trainer, "forward_backward", forward_backward)
    ahead = losses(Trainer(cfg))
    assert [e for e in events if e[0] == "build"] == [("build", 0, False), ("build", 1, True), ("build", 2, True)]
    assert all(e[2] for e in events if e[0] == "run")  # the next build was under way as each step ran
    monkeypatch.setattr(Trainer, "_inputs_of", lambda self, step: built(self, step))
    assert losses(Trainer(cfg)) == ahead
