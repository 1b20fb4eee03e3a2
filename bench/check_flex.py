"""``gpu_check``'s FlexAttention check (issue 18, items 4-7): compiled FlexAttention forward +
backward against SDPA's math backend on packed batches: outputs, gradients, graph counts.

Contract with ``bench/gpu_check.py``: ``run(dry_run) -> dict`` with ``ok`` (true / false /
null = not run) and the numbers measured (e.g. ``max_out_diff``, ``max_grad_diff``,
``graphs``); with ``dry_run`` the CPU version (inductor-CPU compiles the forward only).
Placeholder until the FlexAttention items land: reports the check as not run.
"""


def run(dry_run: bool) -> dict:
    return {"ok": None, "note": "not implemented yet (issue 18, items 4-7)"}
