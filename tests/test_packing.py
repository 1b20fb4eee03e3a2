"""Document masks of packed batches: the dense mask (CPU path) against a by-hand rule, and
the FlexAttention block mask (CUDA path, run here uncompiled) against the dense one."""
import warnings

import pytest
import torch
import torch.nn.functional as F

CU = torch.tensor([0, 5, 12, 13, 40, 64], dtype=torch.int32)  # 5 documents, the last a tail


@pytest.mark.timeout(60)
def test_dense_mask_is_block_diagonal_causal():
    from megaemb.model.attention import DocumentPacking

    mask = DocumentPacking.of(CU, 27, "sbhd").dense_mask()
    doc = [d for d in range(5) for _ in range(CU[d + 1] - CU[d])]
    want = torch.tensor([[doc[i] == doc[j] and j <= i for j in range(64)] for i in range(64)])
    assert torch.equal(mask, want)


@pytest.mark.timeout(120)
def test_flex_block_mask_equals_dense_mask():
    from torch.nn.attention.flex_attention import flex_attention

    from megaemb.model.attention import DocumentPacking

    packing = DocumentPacking.of(CU, 27, "sbhd")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 64, 32, generator=g) for h in (4, 2, 2))  # GQA 4 : 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex_attention warns that it is slow
        flex = flex_attention(q, k, v, block_mask=packing.block_mask(), scale=0.2, enable_gqa=True)
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=packing.dense_mask(), scale=0.2,
                                           enable_gqa=True)
    assert (flex - dense).abs().max() < 1e-5
    assert packing.block_mask() is packing.block_mask()  # built once per forward pass
