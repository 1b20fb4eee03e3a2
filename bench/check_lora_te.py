"""``gpu_check``'s LoRA-under-Transformer-Engine check (issue 18, items 1-2): LoRA adapters on
the TE spec's fused linears vs the SDPA spec (embeddings, adapter gradients).

Contract with ``bench/gpu_check.py``: ``run(dry_run) -> dict`` with ``ok`` (true / false /
null = not run) and the numbers measured; with ``dry_run`` the CPU version (TE fakes).
Placeholder until the LoRA-under-TE items land: reports the check as not run.
"""


def run(dry_run: bool) -> dict:
    return {"ok": None, "note": "not implemented yet (issue 18, items 1-2)"}
