"""``gpu_check``'s LoRA-under-Transformer-Engine check (issue 18, items 1-2): LoRA adapters on
the TE spec's fused linears vs the SDPA spec (embeddings, adapter gradients).

Contract with ``bench/gpu_check.py``: ``run(dry_run, model=None) -> dict`` with ``ok`` (true /
false / null = not run) and the numbers measured. ``model``: an HF checkpoint (``gpu_check``
passes its own; else a random one is made: 0.6B on CUDA, tiny with ``dry_run``).

The same checkpoint is loaded twice with fresh adapters on every dense linear (``load_model(...,
lora=LoRAConfig())``: A is seeded by the weight's name, so both specs start alike), under
``attention="te"`` and ``attention="sdpa"``. B, zero after the init (which would leave the
adapters without effect and A without gradient), is set to the same seeded random values in
both. Then, for fp32 and bf16 and for a padded and a packed batch (TE: THD; SDPA: FlexAttention
on CUDA, per-document SDPA on CPU), one forward + backward of a fixed random projection of the
embeddings, and the TE side is compared with the SDPA side:

    embeddings   fp32: max |difference| <= 1e-4 (gpu_check's spec_parity bound); bf16: min
                 cosine >= 0.999 (likewise)
    gradients    of every adapter's A and B. fp32: max |difference| / max |SDPA's| <= 1e-3 per
                 adapter: both sides are fp32 with exact matmuls, but the backward runs through
                 every layer with other kernels (TE's fused norm, its attention) in another
                 summation order, so 1e-4-ish per layer compounds; an adapter fed the wrong
                 input (the un-normalised hidden state instead of TE's ``ln_out``) is off by
                 O(1). bf16: min cosine >= 0.99 per adapter (bf16 rounds every activation to
                 2^-9 relative; a cosine bound, not a max-difference one, is what bf16 noise
                 leaves meaningful for small adapter gradients); and every A gradient nonzero.

On CUDA it needs Transformer Engine (else ``ok`` null). ``dry_run`` (CPU, CI) runs the same
plan with the tiny model on the TE spec faked by ``tests/te_fakes.py`` (megatron's real TE
layer spec over fp32 torch stand-ins of TE's modules): it checks the adapter wiring
(``ln_out``, names, gradients), not TE's kernels; ``ok`` null when the fakes do not import or
real TE is installed (the fakes would shadow it, and TE does not run on CPU).
"""
from __future__ import annotations

import os
import sys
import tempfile
import zlib

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FP32_EMBEDDING_TOLERANCE = 1e-4
BF16_MIN_COS = 0.999
FP32_GRAD_TOLERANCE = 1e-3  # relative to the largest SDPA-side gradient of that adapter
BF16_GRAD_MIN_COS = 0.99
DTYPES = ("fp32", "bf16")
EOS = 151643  # Qwen3's <|endoftext|>; the ids below lie in Qwen3's vocabulary and the tiny one's
SEQS = [[7 + (i * 13 + j * 5) % 5000 for j in range(n)] + [EOS] for i, n in enumerate((3, 17, 40, 64, 9, 31))]


def _fakes():
    """``tests/te_fakes.py``, or None when it does not import."""
    tests = os.path.join(ROOT, "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    try:
        import te_fakes
    except Exception:
        return None
    return te_fakes


def _b_init(name: str, shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.randn(shape, generator=g) * 0.02


def _side(path: str, spec: str, bf16: bool) -> dict:
    """One spec: embeddings and adapter gradients of a padded and a packed batch."""
    from megaemb import platform
    from megaemb.config import LoRAConfig, ParallelConfig
    from megaemb.convert.load import load_model
    from megaemb.data.batching import text_batch

    model = load_model(path, ParallelConfig(), bf16=bf16, attention=spec, lora=LoRAConfig()).model.eval()
    adapters = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    with torch.no_grad():
        for n, p in adapters.items():
            if ".lora_b." in n:
                p.copy_(_b_init(n, p.shape))
    out = {"qkv": type(model.decoder.layers[0].self_attention.linear_qkv).__name__}
    for packed in (False, True):
        layout = "packed" if packed else "padded"
        batch = text_batch(SEQS, EOS, packed=packed, multiple=model.sequence_multiple).to(platform.device())
        model.zero_grad(set_to_none=True)
        emb = model(batch).float()
        g = torch.Generator().manual_seed(1)
        emb.mul(torch.randn(emb.shape, generator=g).to(emb.device)).sum().backward()
        out[layout] = {"embeddings": emb.detach().cpu(),
                       "grads": {n: p.grad.detach().float().cpu() for n, p in adapters.items()}}
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def _compare(te: dict, sdpa: dict, dtype: str) -> tuple[dict, bool]:
    record, ok = {}, True
    for layout in ("padded", "packed"):
        t, s = te[layout], sdpa[layout]
        key = f"{dtype}_{layout}"
        if sorted(t["grads"]) != sorted(s["grads"]) or not t["grads"]:
            record[f"{key}_error"] = f"adapters differ: {len(t['grads'])} under TE, {len(s['grads'])} under SDPA"
            ok = False
            continue
        names = sorted(s["grads"])
        if dtype == "fp32":
            emb = (t["embeddings"] - s["embeddings"]).abs().max().item()
            grads = max(((t["grads"][n] - s["grads"][n]).abs().max()
                         / s["grads"][n].abs().max().clamp_min(1e-30)).item() for n in names)
            passed = emb <= FP32_EMBEDDING_TOLERANCE and grads <= FP32_GRAD_TOLERANCE
            record[f"{key}_embedding_max_diff"], record[f"{key}_grad_max_rel_diff"] = emb, grads
        else:
            cos = torch.nn.functional.cosine_similarity
            emb = cos(t["embeddings"], s["embeddings"], dim=-1).min().item()
            grads = min(cos(t["grads"][n].flatten(), s["grads"][n].flatten(), dim=0).item() for n in names)
            passed = emb >= BF16_MIN_COS and grads >= BF16_GRAD_MIN_COS
            record[f"{key}_embedding_min_cos"], record[f"{key}_grad_min_cos"] = emb, grads
        a_grad = min(t["grads"][n].abs().max().item() for n in names if ".lora_a." in n)
        record[f"{key}_min_a_grad"] = a_grad
        ok = ok and passed and a_grad > 0  # NaN fails every comparison
    record[f"{dtype}_adapters"] = len(te["padded"]["grads"])
    return record, ok


def run(dry_run: bool, model: str | None = None) -> dict:
    from megaemb import platform
    from megaemb.config import ParallelConfig
    from megaemb.parallel import init_parallel

    fakes = None
    if dry_run:
        if platform.has_transformer_engine():
            return {"ok": None, "note": "Transformer Engine is installed: its fakes would shadow it, "
                                        "and it does not run on CPU (the GPU run checks it)"}
        fakes = _fakes()
        if fakes is None:
            return {"ok": None, "note": "tests/te_fakes.py does not import: no TE spec on CPU"}
    elif not torch.cuda.is_available():
        return {"ok": None, "note": "no CUDA device (--dry-run runs the CPU version)"}
    elif not platform.has_transformer_engine():
        return {"ok": None, "note": "Transformer Engine is not installed"}
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        init_parallel(ParallelConfig(), seed=0)
    record, ok = {"te": "fakes (tests/te_fakes.py)" if fakes else "real"}, True
    with tempfile.TemporaryDirectory(prefix="megaemb-check-lora-te-") as work:
        if model is None:
            if HERE not in sys.path:
                sys.path.insert(0, HERE)
            from models import make_checkpoint

            model = make_checkpoint("tiny" if dry_run else "0.6B", os.path.join(work, "model"))
        if fakes:
            fakes.install()
        try:
            for dtype in DTYPES:
                try:
                    te = _side(model, "te", dtype == "bf16")
                    sdpa = _side(model, "sdpa", dtype == "bf16")
                except Exception as e:  # e.g. a TE kernel refusing fp32 THD: the other dtype still runs
                    record[f"{dtype}_error"] = f"{type(e).__name__}: {e}"[-1000:]
                    ok = False
                    continue
                record.setdefault("te_qkv_module", te["qkv"])
                ok = ok and "TELayerNormColumnParallelLinear" in te["qkv"] and te["qkv"].startswith("LoRA")
                numbers, passed = _compare(te, sdpa, dtype)
                record.update(numbers)
                ok = ok and passed
        finally:
            if fakes:
                fakes.uninstall()
    record["tolerances"] = {"fp32_embedding_max_diff": FP32_EMBEDDING_TOLERANCE, "bf16_embedding_min_cos": BF16_MIN_COS,
                            "fp32_grad_max_rel_diff": FP32_GRAD_TOLERANCE, "bf16_grad_min_cos": BF16_GRAD_MIN_COS}
    return {"ok": bool(ok), **record}


if __name__ == "__main__":  # python bench/check_lora_te.py [--dry-run]
    import json

    result = run(dry_run="--dry-run" in sys.argv)
    print(json.dumps(result, indent=2))
    sys.exit(0 if result["ok"] is not False else 1)
