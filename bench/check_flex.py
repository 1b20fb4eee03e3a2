"""``gpu_check``'s FlexAttention check (issue 18, items 4-7): compiled FlexAttention forward +
backward against SDPA's math backend on packed batches: outputs, gradients, graph counts, and
the block mask's build memory.

Contract with ``bench/gpu_check.py``: ``run(dry_run) -> dict`` with ``ok`` (true / false /
null = not run) and the numbers measured. What runs is megaemb's own path
(``megaemb.model.attention``): ``DocumentPacking.block_mask`` -> ``document_block_mask`` built
from ``cu_seqlens``, and ``_flex_attention`` (``torch.compile(dynamic=True)``, at most
``FLEX_GRAPHS`` graphs), with Qwen3-0.6B's head layout (16 query / 8 KV heads of 128) and the
model's softmax scale.

On CUDA: packed batches of several documents (one-token documents, boundaries inside blocks
and on block edges, T never a multiple of 128), fp32 and bf16, in a mixed sequence of
lengths: a training step (forward + backward) then an evaluation forward (no grad) per layout.
Each is compared with ``F.scaled_dot_product_attention`` on the math backend, in fp64 on the
same (rounded) inputs, under the dense document-causal ``[T, T]`` mask; then the graphs the
sequence compiled are counted, and the block mask is built for T = 32k with the CUDA
allocator's peak measured.

``dry_run`` (CPU, CI): the same plan with small T, fp32 only and forward only (inductor on CPU
compiles FlexAttention's forward, not its backward): the "training" forward runs with grad
enabled (its own graph) and no gradients are compared; the 32k build's memory is the peak
resident-set growth of a child process (an upper bound: it includes allocator slack).
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

HEADS, KV_HEADS, HEAD_DIM = 16, 8, 128  # Qwen3-0.6B per tensor-parallel rank at TP 1
SCALE = 1.0 / math.sqrt(HEAD_DIM)  # SDPAAttention's default: the model's calls reuse the graphs
# Each list: cu_seqlens of one packed batch. One-token documents, boundaries inside a block
# (5, 12, 13, 140, ...) and on block edges (129 - 1, 2048), T % 128 != 0 everywhere.
GPU_LAYOUTS = [[0, 1, 129, 257, 400, 1000, 2333],
               [0, 5, 12, 13, 140, 300, 333],
               [0, 700, 701, 1500, 2048, 3000, 4001],
               [0, 1777]]
CPU_LAYOUTS = [[0, 5, 12, 13, 140, 300, 333], [0, 1, 129, 257, 400]]
MASK_T = 32768  # the block mask's build memory is measured at this length
# Bounds on max |flex - reference|, as a fraction of max(1, max |reference|) of that tensor (the
# outputs are averages of unit-normal values, |.| < ~4, but gradients of keys / values sum
# over every later query of their document and reach ~10, where an absolute bound would only
# measure the final rounding to the dtype):
# - fp32: one rounding is 2^-24 ~ 6e-8 relative; 1e-4 leaves over 1000 ulps for sums of up to
#   4k terms taken in another order (online softmax, split rows), yet is 5x below TF32's one
#   rounding (2^-11 ~ 5e-4): an fp32 kernel that silently ran TF32 dots fails it.
# - bf16: one rounding is 2^-9 ~ 2e-3 relative; the kernel rounds the probabilities P and dS
#   to bf16 before its P @ V / dS @ K dots and the outputs and gradients are stored in bf16,
#   so a few roundings stack: 2e-2 is ~10 ulps, and a wrong mask or scale is off by O(1).
TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Build memory bound: the mask is O(T) (document ids) plus O((T / 128)^2) block tables, ~2 MiB
# at 32k (the CPU child's resident-set growth measured 3-5 MiB); a dense [T, T] bool rule is
# 1 GiB. 1/64 of the dense bytes (16 MiB) leaves 4-8x headroom over the expected build and
# still proves that no [T, T] tensor was made.
MASK_FRACTION = 64


def dense_rule(cu: torch.Tensor, total: int) -> torch.Tensor:
    """``[T, T]`` bool: token i sees token j iff j <= i in the same document."""
    from megaemb.model.attention import document_ids

    doc = document_ids(cu, total)
    idx = torch.arange(total, device=cu.device)
    return (doc[:, None] == doc[None, :]) & (idx[:, None] >= idx[None, :])


def _inputs(total: int, dtype: torch.dtype, device: str, seed: int):
    """q, k, v and the output's gradient as the model holds them, ``[T, b = 1, heads, hn]``
    (megatron's layout), seeded; :func:`_bhsd` gives SDPAAttention's view of them."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(total, 1, h, HEAD_DIM, generator=g).to(device=device, dtype=dtype)
            for h in (HEADS, KV_HEADS, KV_HEADS, HEADS)]


def _bhsd(t: torch.Tensor) -> torch.Tensor:
    """``[T, b, heads, hn]`` -> ``[b, heads, T, hn]``: the permuted view SDPAAttention hands
    FlexAttention (T is not the innermost-but-one stride, as in the model's calls)."""
    return t.permute(1, 2, 0, 3)


def _reference(q, k, v, grad, mask, backward: bool):
    """SDPA's math backend in fp64 on the same (already rounded) inputs: output and, with
    ``backward``, the q / k / v gradients of ``<output, grad>``."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (t.detach().double().requires_grad_(backward) for t in (q, k, v))
    with sdpa_kernel(SDPBackend.MATH), torch.set_grad_enabled(backward):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=SCALE, enable_gqa=True)
        if not backward:
            return out, None
        out.backward(grad.double())
    return out.detach(), [t.grad for t in (q, k, v)]


def _diff(x: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max |x - ref|, the scale its bound applies to: max(1, max |ref|))."""
    return (x.double() - ref).abs().max().item(), max(1.0, ref.abs().max().item())


def _step(cu: list[int], dtype: torch.dtype, device: str, train: bool, backward: bool, seed: int):
    """One packed batch through megaemb's compiled FlexAttention: a training step (grad
    enabled; forward + backward when ``backward``) or an evaluation forward (no grad).
    Returns {name: (diff, scale)} for out and, with backward, q / k / v gradients."""
    from megaemb.model import attention

    total = cu[-1]
    cu_t = torch.tensor(cu, dtype=torch.int32, device=device)
    packing = attention.DocumentPacking.of(cu_t, max(b - a for a, b in zip(cu, cu[1:])), "sbhd")
    q, k, v, grad = _inputs(total, dtype, device, seed)
    grads = train and backward
    leaves = [t.requires_grad_(grads) for t in (q, k, v)]
    with torch.set_grad_enabled(train):
        out = attention._flex_attention(*map(_bhsd, leaves), block_mask=packing.block_mask(total),
                                        scale=SCALE, enable_gqa=True)
        if grads:
            out.backward(_bhsd(grad))
    ref_out, ref_grads = _reference(*map(_bhsd, (q, k, v, grad)), dense_rule(cu_t, total), grads)
    diffs = {"out": _diff(out.detach(), ref_out)}
    if grads:
        for name, t, ref in zip("qkv", leaves, ref_grads):
            diffs[f"grad_{name}"] = _diff(_bhsd(t.grad), ref)
    return diffs


def _mask_memory_cuda(total: int) -> int:
    """Peak CUDA allocation (bytes) above the start while the block mask of ``total`` tokens
    (several documents) is built."""
    from megaemb.model.attention import document_block_mask

    cu = torch.tensor(_mask_layout(total), dtype=torch.int32, device="cuda")
    document_block_mask(torch.tensor([0, 100, 300], dtype=torch.int32, device="cuda"), 300)  # first use
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    mask = document_block_mask(cu, total)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - start
    del mask
    return peak


def _mask_layout(total: int) -> list[int]:
    return [0, 1, 1000, total // 2 + 3, total - 777, total]


_RSS_CHILD = """
import re, sys, torch
from megaemb.model.attention import document_block_mask
torch.set_num_threads(1)
total, cu = int(sys.argv[1]), torch.tensor([int(x) for x in sys.argv[2:]], dtype=torch.int32)
document_block_mask(torch.tensor([0, 100, 300], dtype=torch.int32), 300)  # kernels paged in
def kib(field):
    return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))
try:  # the peak (VmHWM) starts again from the current resident set
    open("/proc/self/clear_refs", "w").write("5")
except OSError:
    pass  # without: the peak may predate the build (an overestimate)
now = kib("VmRSS")
mask = document_block_mask(cu, total)
print((kib("VmHWM") - now) * 1024)
"""


def _mask_memory_cpu(total: int) -> int:
    """Peak resident-set growth (bytes) of a fresh process while it builds the block mask
    (``VmHWM``, reset first; not ``ru_maxrss``, which a child inherits from its parent on
    Linux): an upper bound of what the build allocates (allocator slack, pages touched)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""),
               CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(total)] + [str(x) for x in _mask_layout(total)],
                       capture_output=True, text=True, env=env, timeout=300, check=True)
    return int(r.stdout.split()[-1])


def run(dry_run: bool) -> dict:
    from torch._dynamo.utils import counters

    from megaemb import platform
    from megaemb.model import attention

    if not dry_run and not torch.cuda.is_available():
        return {"ok": None, "note": "no CUDA device (--dry-run runs the CPU version)"}
    device = "cpu" if dry_run else "cuda"
    if not dry_run:
        platform.exact_fp32_matmuls()  # as training sets it: fp32 flex dots are IEEE, not TF32
    backward = not dry_run
    dtypes = ["fp32"] if dry_run else ["fp32", "bf16"]
    layouts = CPU_LAYOUTS if dry_run else GPU_LAYOUTS
    record = {"device": device, "backward": backward, "heads": [HEADS, KV_HEADS, HEAD_DIM],
              "lengths": [cu[-1] for cu in layouts], "tolerance": {d: TOLERANCE[d] for d in dtypes}}
    ok = True
    start = counters["stats"]["unique_graphs"]
    seed = 0
    for name in dtypes:
        worst = {}
        for cu in layouts:
            for train in (True, False):  # a training step, then an evaluation forward
                seed += 1
                for key, (diff, scale) in _step(cu, DTYPES[name], device, train, backward, seed).items():
                    ok = ok and diff <= TOLERANCE[name] * scale  # NaN fails too
                    worst[key] = max(worst.get(key, 0.0), diff) if diff == diff else float("nan")
        record[f"{name}_max_out_diff"] = worst["out"]
        for t in "qkv":
            record[f"{name}_max_grad_diff_{t}"] = worst.get(f"grad_{t}")  # None: forward only
    # one graph per (dtype, grad mode) at most, whatever the lengths: the model may already
    # have compiled some of them (same head layout), so fewer is fine
    graphs = counters["stats"]["unique_graphs"] - start
    record.update(graphs_added=graphs, graphs_expected_max=2 * len(dtypes),
                  flex_graphs=attention.flex_graphs, flex_graphs_bound=attention.FLEX_GRAPHS)
    ok = ok and graphs <= 2 * len(dtypes) and attention.flex_graphs <= attention.FLEX_GRAPHS
    built = _mask_memory_cpu(MASK_T) if dry_run else _mask_memory_cuda(MASK_T)
    dense = MASK_T * MASK_T
    record.update(mask_T=MASK_T, mask_build_bytes=built, dense_mask_bytes=dense,
                  mask_build_bound_bytes=dense // MASK_FRACTION)
    ok = ok and built <= dense // MASK_FRACTION
    return {"ok": bool(ok), **record}


if __name__ == "__main__":  # python bench/check_flex.py [--dry-run]
    import json

    result = run(dry_run="--dry-run" in sys.argv)
    print(json.dumps(result, indent=2))
    sys.exit(0 if result["ok"] is not False else 1)
