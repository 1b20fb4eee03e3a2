"""Global-batch negatives (``--global_negatives``) against micro-batch negatives, in one run on
one device: dev retrieval after the same steps, the time per step at equal global batch, and
(``--max_batch``, GPU) the largest global batch of (query, positive, 3 negatives) groups each
can train.

    python bench/global_negatives.py --size 0.6B --steps 200 --max_batch   # one GPU
    python bench/global_negatives.py --size tiny --steps 120               # CPU, minutes

Each side is one ``megaemb sft`` process on the bench's debian-desc slice (``bench/data``),
with ``demo/data/dev.jsonl`` as the dev set; recall@10 comes from its ``metrics.json``, the
time per step from its interval log lines. The micro-batch-negatives side sees
``micro_batch_size`` groups per loss; the other, the whole ``global_batch_size``. A max-batch
probe doubles the global batch (2 steps each) until a run fails: the plain side needs the
whole batch in one micro-batch to see that many negatives, the cached side keeps
``--micro_batch_size``. Writes ``--output`` (default ``bench/results/<device>-<date>-negatives.json``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
TRAIN = os.path.join(ROOT, "bench", "data", "debian-desc-train-2k.jsonl")
DEV = os.path.join(ROOT, "demo", "data", "dev.jsonl")


def sft(model: str, save: str | None, args, *, global_negatives: bool, global_batch: int,
        micro_batch: int, steps: int, evaluate: bool) -> dict:
    """One ``megaemb sft`` run: wall time, groups/s and seconds per step of its last interval
    line, and (with ``save``) its ``metrics.json``; ``failed`` with the error's last line when
    it did not finish."""
    cmd = [sys.executable, "-m", "megaemb.cli", "sft", "--model", model, "--dataset", TRAIN,
           "--max_length", str(args.max_length), "--micro_batch_size", str(micro_batch),
           "--global_batch_size", str(global_batch), "--train_iters", str(steps), "--lr", str(args.lr),
           "--lr_decay_style", "constant", "--infonce_temperature", "0.05", "--log_interval",
           str(max(1, steps // 4)), "--global_negatives", str(global_negatives).lower()]
    if save:
        cmd += ["--save", save, "--save_interval", "0"]
    if evaluate:
        cmd += ["--val_dataset", DEV, "--eval_limit", str(args.eval_limit)]
    env = dict(os.environ, NPROC_PER_NODE="1", PYTHONWARNINGS="ignore")
    start = time.time()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.time() - start
    if r.returncode:
        tail = [l for l in r.stderr.strip().splitlines() if l.strip()][-1:] or ["?"]
        return {"failed": tail[0][-300:], "wall_s": wall}
    rates = [float(m) for m in re.findall(r"samples/s ([\d.]+)", r.stdout + r.stderr)]
    out = {"wall_s": wall, "groups_per_s": rates[-1] if rates else None,
           "seconds_per_step": global_batch / rates[-1] if rates else None}
    if save:
        with open(os.path.join(save, "metrics.json")) as f:
            metrics = json.load(f)
        out["last_step_loss"] = metrics["last_step_loss"]
    if evaluate:
        out.update({f"{k}_before": metrics["eval_before"][k] for k in ("recall@10", "ndcg@10")})
        out.update({f"{k}_after": metrics["eval_after"][k] for k in ("recall@10", "ndcg@10")})
    return out


def max_global_batch(model: str, args, *, global_negatives: bool, cap: int) -> int:
    """Largest power-of-two global batch (from 8) that trains 2 steps."""
    best, batch = 0, 8
    while batch <= cap:
        micro = args.micro_batch_size if global_negatives else batch
        run = sft(model, None, args, global_negatives=global_negatives, global_batch=batch,
                  micro_batch=micro, steps=2, evaluate=False)
        print(f"max batch probe: global_negatives={global_negatives} global_batch={batch}: "
              + ("fits" if "failed" not in run else f"fails ({run['failed'][:120]})"), flush=True)
        if "failed" in run:
            break
        best, batch = batch, batch * 2
    return best


def main(argv=None) -> dict:
    from models import SIZES, make_checkpoint

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=SIZES, default="tiny")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--global_batch_size", type=int, default=32)
    p.add_argument("--micro_batch_size", type=int, default=4)
    p.add_argument("--max_length", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--eval_limit", type=int, default=300)
    p.add_argument("--max_batch", action="store_true", help="probe the largest global batch (GPU)")
    p.add_argument("--max_batch_cap", type=int, default=8192)
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    import torch

    device = torch.cuda.get_device_name().replace(" ", "-") if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as work:
        model = make_checkpoint(args.size, os.path.join(work, "model"))
        report = {"device": device, "size": args.size, "steps": args.steps,
                  "global_batch_size": args.global_batch_size, "micro_batch_size": args.micro_batch_size}
        for name, gn in (("micro_batch_negatives", False), ("global_negatives", True)):
            report[name] = sft(model, os.path.join(work, name), args, global_negatives=gn,
                               global_batch=args.global_batch_size, micro_batch=args.micro_batch_size,
                               steps=args.steps, evaluate=True)
            print(f"{name}: {report[name]}", flush=True)
        plain, cached = report["micro_batch_negatives"], report["global_negatives"]
        if plain.get("seconds_per_step") and cached.get("seconds_per_step"):
            report["time_overhead"] = cached["seconds_per_step"] / plain["seconds_per_step"] - 1
        if args.max_batch:
            report["max_global_batch"] = {
                name: max_global_batch(model, args, global_negatives=gn, cap=args.max_batch_cap)
                for name, gn in (("micro_batch_negatives", False), ("global_negatives", True))}
    out = args.output or os.path.join(
        ROOT, "bench", "results", f"{device}-{datetime.date.today()}-negatives"
        + ("-tiny" if args.size == "tiny" else "") + ".json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
