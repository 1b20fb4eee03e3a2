"""Document masks of packed batches. The reference is the dense ``[T, T]`` rule written by
hand; the FlexAttention block mask (CUDA path) is built from ``cu_seqlens`` and checked
against it uncompiled and compiled (inductor on CPU compiles FlexAttention's forward), and the
per-document SDPA path (CPU, and attention dropout) against it in values and in memory."""
import os
import subprocess
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

CU = torch.tensor([0, 5, 12, 13, 40, 64], dtype=torch.int32)  # 5 documents, the last a tail
# T not a multiple of 128; boundaries inside blocks, on a block edge, one-token documents
LAYOUTS = [[0, 5, 12, 13, 140, 300, 333], [0, 128, 256, 300], [0, 1, 129, 257, 400], [0, 333]]


def dense_rule(cu: list[int]) -> torch.Tensor:
    """``[T, T]`` bool: token i sees token j iff j <= i in the same document (by hand)."""
    doc = [d for d in range(len(cu) - 1) for _ in range(cu[d + 1] - cu[d])]
    idx = torch.arange(len(doc))
    doc = torch.tensor(doc)
    return (doc[:, None] == doc[None, :]) & (idx[:, None] >= idx[None, :])


def qkv(total: int, heads=(4, 2, 2), dim=32, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, h, total, dim, generator=g).to(dtype) for h in heads]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("cu", LAYOUTS + [CU.tolist()])
def test_block_mask_from_cu_seqlens_is_the_document_rule(cu):
    from torch.nn.attention.flex_attention import create_block_mask

    from megaemb.model.attention import document_block_mask

    total, rule = cu[-1], dense_rule(cu)
    mask = document_block_mask(torch.tensor(cu, dtype=torch.int32), total)
    assert torch.equal(mask.to_dense()[0, 0], _block_table(rule))
    # the blocks it skips or marks full are exactly torch's, within the sequence
    ref = create_block_mask(lambda b, h, q, kv: rule[q, kv], None, None, total, total, device="cpu")
    assert torch.equal(mask.to_dense(), ref.to_dense())


def _block_table(rule: torch.Tensor, block: int = 128) -> torch.Tensor:
    n = -(-rule.shape[0] // block)
    padded = torch.zeros(n * block, n * block, dtype=torch.bool)
    padded[: rule.shape[0], : rule.shape[1]] = rule
    return padded.reshape(n, block, n, block).any(3).any(1)


@pytest.mark.timeout(120)
def test_block_mask_matches_dense_rule_in_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    from megaemb.model.attention import DocumentPacking

    packing = DocumentPacking.of(CU, 27, "sbhd")
    q, k, v = qkv(64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex_attention warns that it is slow
        flex = flex_attention(q, k, v, block_mask=packing.block_mask(64), scale=0.2, enable_gqa=True)
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_rule(CU.tolist()), scale=0.2,
                                           enable_gqa=True)
    assert (flex - dense).abs().max() < 1e-5
    assert packing.block_mask(64) is packing.block_mask(64)  # built once per forward pass


def _attention(dropout: float):
    """``SDPAAttention`` on a stand-in config (sequence parallel: dropout needs no RNG fork)."""
    from megaemb.model.attention import SDPAAttention

    config = SimpleNamespace(context_parallel_size=1, kv_channels=32, attention_dropout=dropout,
                             sequence_parallel=True)
    return SDPAAttention(config, 1, None, None)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_packed_attention_is_per_document_causal_sdpa(dropout, monkeypatch):
    """CPU and attention-dropout path: one unmasked causal SDPA per document, GQA K/V never
    repeated and no ``[T, T]`` mask, so CUDA's flash kernel (dropout, GQA) can run each call;
    without dropout the values are the dense rule's."""
    from megaemb.model.attention import DocumentPacking

    cu = LAYOUTS[0]
    calls, sdpa = [], F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        calls.append((q.shape[2], k.shape[1], kw.get("attn_mask"), kw.get("is_causal")))
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    q, k, v = qkv(cu[-1])
    attn = _attention(dropout)
    packing = DocumentPacking.of(torch.tensor(cu, dtype=torch.int32), 160, "sbhd")
    out = attn(*(t.permute(2, 0, 1, 3) for t in (q, k, v)), packed_seq_params=packing)
    assert [c[0] for c in calls] == [e - s for s, e in zip(cu[:-1], cu[1:])]
    assert all(kv_heads == 2 and mask is None and causal for _, kv_heads, mask, causal in calls)
    if not dropout:
        want = sdpa(q, k, v, attn_mask=dense_rule(cu), scale=attn.softmax_scale, enable_gqa=True)
        assert (out - want.permute(2, 0, 1, 3).reshape(cu[-1], 1, -1)).abs().max() < 1e-5


LONG = """
import resource, torch
from types import SimpleNamespace
from megaemb.model.attention import DocumentPacking, SDPAAttention, document_block_mask
T = 2 * 16384
cu = torch.tensor([0, T // 2, T], dtype=torch.int32)
q, k, v = (torch.randn(T, 1, h, 16) for h in (2, 1, 1))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
mask = document_block_mask(cu, T)
config = SimpleNamespace(context_parallel_size=1, kv_channels=16, attention_dropout=0.0,
                         sequence_parallel=False)
with torch.no_grad():
    SDPAAttention(config, 1, None, None)(q, k, v, packed_seq_params=DocumentPacking.of(cu, T // 2, "sbhd"))
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


@pytest.mark.timeout(300)
def test_long_packed_texts_need_no_dense_mask_memory():
    """Two 16k-token texts packed: the block mask and the CPU attention together stay far
    below one dense ``[T, T]`` bool mask (1 GiB at T = 32k)."""
    env = dict(os.environ, PYTHONPATH=os.getcwd(), OMP_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", LONG], capture_output=True, text=True, env=env,
                         timeout=280)
    assert out.returncode == 0, out.stderr[-2000:]
    grown_mib = float(out.stdout.split()[-1])
    assert grown_mib < 128, f"peak RSS grew {grown_mib:.0f} MiB"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_compiled_flex_equals_sdpa_and_graphs_stay_bounded(monkeypatch):
    """FlexAttention compiled by inductor on CPU (forward only) with the block mask equals
    SDPA with the dense rule, T not a multiple of 128, 16 / 8 heads of 128, fp32 and bf16;
    a train + eval mix of lengths compiles one graph per (dtype, grad mode), and one past
    ``FLEX_GRAPHS`` is an error, not a silent unfused fallback."""
    from torch._dynamo.utils import counters

    from megaemb.model import attention

    attention.flex_graphs = 0
    start = counters["stats"]["unique_graphs"]
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        for grad in (True, False):  # a training forward, then evaluation under no_grad
            for cu in LAYOUTS[:3]:
                q, k, v = qkv(cu[-1], (16, 8, 8), 128, dtype)
                mask = attention.document_block_mask(torch.tensor(cu, dtype=torch.int32), cu[-1])
                with torch.set_grad_enabled(grad):
                    out = attention._flex_attention(q, k, v, block_mask=mask, scale=0.1,
                                                    enable_gqa=True)
                want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=0.1,
                                                      attn_mask=dense_rule(cu), enable_gqa=True)
                assert (out.float() - want).abs().max() < tol, (dtype, grad, cu)
    assert attention.flex_graphs == 4 == counters["stats"]["unique_graphs"] - start
    monkeypatch.setattr(attention, "FLEX_GRAPHS", 4)
    q, k, v = qkv(200, (16, 8, 8), 64)  # a fifth kind of call: head_dim 64
    mask = attention.document_block_mask(torch.tensor([0, 200], dtype=torch.int32), 200)
    with pytest.raises(Exception, match="recompile"):
        attention._flex_attention(q, k, v, block_mask=mask, scale=0.1, enable_gqa=True)


@pytest.mark.timeout(60)
def test_micro_batch_log_line_says_what_it_means():
    """The log line about ``--packing`` is words a newcomer can read, not ``padded [n, s]``."""
    from megaemb.logs import micro_batch_note

    padded, packed = micro_batch_note(False), micro_batch_note(True, 4096)
    assert padded.startswith("micro-batches: padded (--packing false): one row per text") and "[" not in padded
    assert packed.startswith("micro-batches: packed (--packing true): a micro-batch's texts are concatenated")
    assert packed.endswith("at most 4096 tokens each (--max_tokens_per_micro_batch)"), packed
