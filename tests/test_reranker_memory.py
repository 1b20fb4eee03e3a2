"""Memory of a generative reranker training step: within a few percent of the embedder's at the
same tokens (the same tiny backbone with the real 151,669-token vocabulary), while a causal LM
that builds the vocabulary logits (transformers' ``Qwen3ForCausalLM``, as ms-swift's Megatron
path and Tevatron score) needs at least those logits more.

Memory is the peak of CPU allocations over one forward + loss + backward (torch's CPU memory
profiler), the megaemb models wrapped in megatron's ``DistributedDataParallel`` as ``train.py``
does (gradients land in its preallocated buffer, which is not part of the step's peak).
"""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from megaemb.model.flops import vocab_logits_bytes
from megaemb.model.heads import QWEN3_NO, QWEN3_YES
from megaemb.tiny import tiny_config

PAD = 151643
TEXTS, LENGTH, GROUP = 8, 32, 4  # 8 prompts (2 groups of 4) of 32 tokens: 256 tokens


def _peak(step) -> int:
    """Peak bytes of CPU memory the allocator hands out during ``step()`` above what was
    allocated before it, from torch's CPU memory profiler (its allocation and free events in
    time order; unlike a dispatch mode it leaves autograd's in-place gradient accumulation on)."""
    step()  # warm-up: lazily built state (rotary caches, DDP's buffers) is not the step's
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return peak


def _ids() -> torch.Tensor:
    return torch.randint(0, PAD - 1, (TEXTS, LENGTH), generator=torch.Generator().manual_seed(0))


def _listwise(scores: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch listwise CE over groups of ``GROUP``, the positive first."""
    groups = scores.view(-1, GROUP)
    return torch.nn.functional.cross_entropy(groups, torch.zeros(len(groups), dtype=torch.long))


def _megaemb_step(model, reranker: bool):
    from megaemb.data.batching import text_batch

    batch = text_batch(_ids().tolist(), PAD, packed=False)

    def step():
        out = model(batch)
        if reranker:  # [n] scores
            loss = _listwise(out)
        else:  # [n, h] embeddings: InfoNCE of the first half against the second
            sim = out[: TEXTS // 2] @ out[TEXTS // 2:].T / 0.05
            loss = torch.nn.functional.cross_entropy(sim, torch.arange(TEXTS // 2))
        loss.backward()
        model.zero_grad_buffer()
    return step


def _hf_step(model):
    """The causal LM's score: full ``[n, s, V]`` logits, then ``l_yes - l_no`` at the end."""
    ids = _ids()

    def step():
        logits = model(input_ids=ids).logits
        _listwise(logits[:, -1, QWEN3_YES] - logits[:, -1, QWEN3_NO]).backward()
        model.zero_grad(set_to_none=True)
    return step


@pytest.fixture(scope="module")
def parallel():
    from megaemb.config import ParallelConfig
    from megaemb.parallel import destroy_parallel, init_parallel

    init_parallel(ParallelConfig())
    yield
    destroy_parallel()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_reranker_step_memory_is_the_embedders(parallel, tied):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from transformers import Qwen3ForCausalLM

    from megaemb.model.embedder import build_model
    from megaemb.model.heads import YesNoHead
    from megaemb.model.qwen3 import transformer_config
    from megaemb.shape import Qwen3Shape

    hf_config = tiny_config(tied=tied)
    shape = Qwen3Shape.from_hf(hf_config.to_dict())
    config = transformer_config(shape, _parallel_config(), attention="sdpa")
    ddp = DistributedDataParallelConfig(grad_reduce_in_fp32=True)
    torch.manual_seed(0)
    peaks = {}
    for name, kw in (("embedder", {}), ("reranker", dict(
            head=YesNoHead(vocab_size=shape.vocab_size), output_layer="lm_head"))):
        model = DistributedDataParallel(config, ddp, build_model(config, shape, attention="sdpa", **kw))
        peaks[name] = _peak(_megaemb_step(model, name == "reranker"))
        del model
    peaks["causal_lm"] = _peak(_hf_step(Qwen3ForCausalLM(hf_config).float()))
    logits = vocab_logits_bytes(shape, TEXTS * LENGTH, bytes_per_value=4)
    print({k: f"{v / 2**20:.1f} MiB" for k, v in peaks.items()}, f"logits {logits / 2**20:.1f} MiB")
    # the head's [8, 151,669] last-token logits alone (4.9 MB) would be > 3% of the step
    assert peaks["reranker"] <= 1.03 * peaks["embedder"], peaks
    assert peaks["causal_lm"] - peaks["reranker"] >= logits, (peaks, logits)


def _parallel_config():
    from megaemb.config import ParallelConfig

    return ParallelConfig()
