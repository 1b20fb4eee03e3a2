"""The first GPU run's checks, in one command (``bench/gpu_check.sh``; issue 18).

What only a GPU can show, each check a record with ``ok`` (true, false, or null = skipped)
and its numbers:

    versions          torch, CUDA, cuDNN, megatron-core, TE, flash-attn, apex, triton; ok when
                      torch and TE lie in megatron-core's declared ranges
    spec_parity       embeddings of the TE spec and the SDPA spec, padded and packed (TE: THD;
                      SDPA: FlexAttention on CUDA), in fp32 and bf16, against the SDPA spec
                      padded in the same dtype: fp32 max |difference| <= 1e-4, bf16 cos >= 0.999
    flex              FlexAttention forward + backward vs SDPA math: ``bench/check_flex.py``
    lora_te           LoRA under the TE spec: ``bench/check_lora_te.py``
    gpu_smoke         ``bench/gpu_smoke.sh``: HF -> MCore -> sft -> HF -> embed, vs transformers
    throughput        ``bench/throughput.py --sizes 0.6B --profile``, without and with
    throughput_recompute   ``--recompute full``; ok when both sides' embeddings agree
                      (largest 1 - cos <= 1e-2 in bf16, 1e-5 in fp32)
    throughput_reranker  ``--task generative_reranker --sizes 0.6B,8B``: Qwen3-Reranker shapes,
                      megaemb's yes/no head vs ``Qwen3ForCausalLM`` with ``logits_to_keep=1``;
                      ok when the scores agree (relative to the largest, as above)
    global_negatives  ``bench/global_negatives.py --size 0.6B --max_batch`` (probes up to 2,048)

Writes ``bench/results/<device>-<date>.json`` (``--output``) and exits 1 when a check fails.
``--dry-run`` runs the same plan on CPU with the tiny model (fp32 and bf16 on CPU, no TE spec
unless TE imports, smoke and benchmarks in their CPU sizes) so that CI keeps it working.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import re
import subprocess
import sys
import tempfile

import torch

import check_flex  # bench/ (the script's folder is on sys.path): other items' checks
import check_lora_te

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FP32_TOLERANCE = 1e-4
BF16_MIN_COS = 0.999
SEQS = [[7 + (i * 13 + j * 5) % 5000 for j in range(n)] + [151643]  # ids of Qwen3's vocabulary
        for i, n in enumerate((3, 17, 40, 64, 9, 100, 31))]


def versions(args) -> dict:
    from megaemb import platform

    found = platform.versions()
    problems = platform.version_problems(found)
    return {"ok": not problems, **found, "problems": problems}


def _embed(model, packed: bool) -> torch.Tensor:
    from megaemb import platform
    from megaemb.data.batching import text_batch

    batch = text_batch(SEQS, 151643, packed=packed, multiple=model.sequence_multiple)
    with torch.no_grad():
        return model(batch.to(platform.device())).float().cpu()


def spec_parity(args) -> dict:
    """Each (spec, layout, dtype) against the SDPA spec padded in the same dtype."""
    from megaemb import platform
    from megaemb.config import ParallelConfig
    from megaemb.convert.load import load_model

    specs = (["te"] if platform.has_transformer_engine() else []) + ["sdpa"]
    out, ok = {"specs": specs}, True
    for dtype in ("fp32", "bf16"):
        embeddings = {}
        for spec in specs:
            model = load_model(args.model, ParallelConfig(), bf16=dtype == "bf16", attention=spec).model.eval()
            for packed in (False, True):
                embeddings[f"{spec}_{'packed' if packed else 'padded'}"] = _embed(model, packed)
            del model
            _free()
        reference = embeddings["sdpa_padded"]
        for name, e in embeddings.items():
            if dtype == "fp32":
                value = (e - reference).abs().max().item()
                passed = value <= FP32_TOLERANCE
            else:
                value = torch.nn.functional.cosine_similarity(e, reference, dim=-1).min().item()
                passed = value >= BF16_MIN_COS
            out[f"{dtype}_{name}"] = value
            ok = ok and passed
    return {"ok": ok, **out}


def _run(cmd: list[str], args, env: dict | None = None) -> dict:
    """Run a benchmark script; its outcome as a record (``ok`` = exit code 0)."""
    from megaemb.train import single_process_env

    env = {**single_process_env(), "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "PYTHON": sys.executable, **(env or {})}  # without this process's rendezvous variables
    print("+ " + " ".join(cmd), flush=True)
    try:
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {args.timeout} s"}
    record = {"ok": r.returncode == 0, "returncode": r.returncode}
    if r.returncode:
        record["error"] = (r.stdout + r.stderr)[-3000:]
    return record


def gpu_smoke(args) -> dict:
    return _run(["bash", "bench/gpu_smoke.sh"], args, {"SMOKE_DEVICE": "cpu" if args.dry_run else "cuda"})


def _throughput(args, recompute: bool = False, reranker: bool = False) -> dict:
    """``bench/throughput.py``; ok when both sides agree on the first step: embeddings' cosine
    distance, or a reranker's scores relative to their largest (fp32 1e-5, bf16 1e-2)."""
    name = "throughput" + ("-recompute" if recompute else "") + ("-reranker" if reranker else "")
    out = os.path.join(args.work, f"{name}.json")
    cmd = [sys.executable, "bench/throughput.py", "--profile", "--output", out]
    if args.dry_run:
        cmd += ["--tiny", "--workloads", "mix" if reranker else "dense"]
    else:  # the reranker at Qwen3-Reranker-0.6B's and -8B's shapes (8B: untied, as released)
        cmd += ["--sizes", "0.6B,8B" if reranker else "0.6B", "--steps", "5"]
    cmd += ["--recompute", "full"] if recompute else []
    cmd += ["--task", "generative_reranker"] if reranker else []
    record = _run(cmd, args)
    if not record["ok"]:
        return record
    report = json.load(open(out))
    limit = 1e-2 if report["dtype"] == "bf16" else 1e-5
    keys = re.compile(r"(tokens_per_s|mfu|peak_gib|speedup|max_cos_distance|max_score_diff|"
                      r"embedding_backward_ms_per_step|error)$")
    ok = True
    for size, workloads in report["by_size"].items():
        for w, r in workloads.items():
            prefix = f"{w}_" if len(report["by_size"]) == 1 else f"{size}_{w}_"
            record.update({prefix + k: v for k, v in r.items() if keys.search(k)})
            if reranker:
                diff = r.get("max_score_diff")
                ok &= diff is not None and diff <= limit * max(1.0, r["max_abs_score"])
            else:
                ok &= r.get("max_cos_distance") is not None and r["max_cos_distance"] <= limit
    record["ok"] = ok
    return record


def global_negatives(args) -> dict:
    out = os.path.join(args.work, "negatives.json")
    cmd = [sys.executable, "bench/global_negatives.py", "--output", out]
    cmd += ["--size", "tiny", "--steps", "2", "--eval_limit", "20"] if args.dry_run else \
        ["--size", "0.6B", "--steps", "10", "--eval_limit", "100", "--max_batch", "--max_batch_cap", "2048"]
    record = _run(cmd, args)
    if record["ok"]:
        report = json.load(open(out))
        record.update({k: report.get(k) for k in ("time_overhead", "max_global_batch")})
    return record


CHECKS = {
    "versions": versions,
    "spec_parity": spec_parity,
    "flex": lambda args: check_flex.run(dry_run=args.dry_run),
    "lora_te": lambda args: check_lora_te.run(dry_run=args.dry_run, model=args.model),
    "gpu_smoke": gpu_smoke,
    "throughput": lambda args: _throughput(args, recompute=False),
    "throughput_recompute": lambda args: _throughput(args, recompute=True),
    "throughput_reranker": lambda args: _throughput(args, reranker=True),
    "global_negatives": global_negatives,
}


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _device() -> str:
    return torch.cuda.get_device_name().replace(" ", "-") if torch.cuda.is_available() else "cpu"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", dest="dry_run", action="store_true",
                   help="the same plan on CPU with the tiny model (what CI runs)")
    p.add_argument("--only", default=",".join(CHECKS), help="comma-separated checks (default: all)")
    p.add_argument("--timeout", type=int, default=600, help="seconds for each benchmark script")
    p.add_argument("--output", help="default bench/results/<device>-<date>.json (-tiny.json with --dry-run)")
    args = p.parse_args(argv)
    args.only = args.only.split(",")
    unknown = [c for c in args.only if c not in CHECKS]
    if unknown:
        p.error(f"unknown checks {unknown} (of {', '.join(CHECKS)})")
    if not args.dry_run and not torch.cuda.is_available():
        p.error("no CUDA device: --dry-run runs the CPU version")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from megaemb.config import ParallelConfig
    from megaemb.parallel import init_parallel
    from models import make_checkpoint

    init_parallel(ParallelConfig(), seed=0)
    report = {"device": _device(), "date": datetime.date.today().isoformat(), "dry_run": args.dry_run,
              "checks": {}}
    with tempfile.TemporaryDirectory(prefix="megaemb-gpu-check-") as work:
        args.work = work
        args.model = make_checkpoint("tiny" if args.dry_run else "0.6B", os.path.join(work, "model"))
        for name in args.only:
            try:
                record = CHECKS[name](args)
            except Exception as e:  # a crash is a failed check, and the others still run
                record = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            report["checks"][name] = record
            state = {True: "ok", False: "FAILED", None: "skipped"}[record["ok"]]
            print(f"gpu_check: {name}: {state}" + (f" ({record['error'][-300:]})" if record.get("error") else ""),
                  flush=True)
    failed = [k for k, v in report["checks"].items() if v["ok"] is False]
    report["ok"] = not failed
    path = args.output or os.path.join(HERE, "results", f"{report['device']}-{report['date']}"
                                       f"{'-tiny' if args.dry_run else ''}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"gpu_check: {'ok' if not failed else 'FAILED: ' + ', '.join(failed)} (wrote {path})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
