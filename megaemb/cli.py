"""``megaemb`` command line: flags follow Megatron-SWIFT's spelling (``--to_mcore true``)."""
from __future__ import annotations

import argparse
import os
import sys


def str2bool(v: str) -> bool:
    if isinstance(v, bool):
        return v
    if v.lower() in ("true", "1", "yes"):
        return True
    if v.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {v!r}")


def add_parallel_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parallelism (world size = NPROC_PER_NODE * NNODES)")
    g.add_argument("--tensor_model_parallel_size", type=int, default=1)
    g.add_argument("--pipeline_model_parallel_size", type=int, default=1)
    g.add_argument("--expert_model_parallel_size", type=int, default=1)
    g.add_argument("--context_parallel_size", type=int, default=1)
    g.add_argument("--sequence_parallel", type=str2bool, default=False)
    g.add_argument("--bf16", type=str2bool, default=False, help="bf16 weights (default fp32)")
    g.add_argument("--seed", type=int, default=42)


def parallel_config(args):
    from megaemb.config import ParallelConfig

    return ParallelConfig(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        context_parallel_size=args.context_parallel_size,
        sequence_parallel=args.sequence_parallel)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megaemb", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    e = sub.add_parser("export", help="convert HF <-> Megatron-Core checkpoints")
    e.add_argument("--model", help="HF model directory (with --to_mcore)")
    e.add_argument("--mcore_model", help="megaemb MCore checkpoint directory (with --to_hf)")
    e.add_argument("--to_mcore", type=str2bool, default=False)
    e.add_argument("--to_hf", type=str2bool, default=False)
    e.add_argument("--output_dir", required=True)
    e.add_argument("--test_convert_precision", type=str2bool, default=False,
                   help="compare the converted model with transformers on sample texts")
    e.add_argument("--max_shard_size", default="5GB", help="HF safetensors shard size (--to_hf)")
    e.add_argument("--iteration", type=int, default=None,
                   help="checkpoint iteration to export with --to_hf (default: the latest)")
    e.add_argument("--overwrite", type=str2bool, default=False,
                   help="replace an existing, non-empty --output_dir")
    add_parallel_flags(e)

    m = sub.add_parser("embed", help="embed texts with an HF or MCore checkpoint")
    m.add_argument("--model", required=True, help="HF model dir or megaemb MCore checkpoint dir")
    m.add_argument("--input", required=True, help=".txt (a text per line) or .jsonl")
    m.add_argument("--output", required=True, help=".npy file, float32 [n, dim]")
    m.add_argument("--text_field", default="text")
    m.add_argument("--instruction", default=None, help="task for 'Instruct: {task}\\nQuery:{text}'")
    m.add_argument("--max_length", type=int, default=8192)
    m.add_argument("--batch_size", type=int, default=32)
    m.add_argument("--dim", type=int, default=None, help="Matryoshka dimension")
    add_parallel_flags(m)
    s = sub.add_parser("sft", help="train an embedding model (contrastive losses)")
    s.add_argument("--config", help="YAML with the same keys as the flags; flags override it")
    add_dataclass_flags(s)
    return parser


def add_dataclass_flags(p: argparse.ArgumentParser) -> None:
    """One flag per ``SFTConfig`` field; defaults are None so YAML values are not overridden."""
    import dataclasses

    from megaemb.config import SFTConfig

    for f in dataclasses.fields(SFTConfig):
        kind = str(f.type)
        if kind.startswith("list"):
            p.add_argument(f"--{f.name}", nargs="+", default=None,
                           type=int if "int" in kind else str)
        elif kind == "bool":
            p.add_argument(f"--{f.name}", type=str2bool, default=None)
        else:
            p.add_argument(f"--{f.name}", type={"int": int, "float": float}.get(kind, str), default=None)
    p.add_argument("--eval_dataset", dest="val_dataset", nargs="+", default=None,
                   help="alias of --val_dataset")


def sft_config(args):
    """Defaults < YAML (``--config``) < flags."""
    import dataclasses

    import yaml

    from megaemb.config import SFTConfig

    values = {}
    if args.config:
        with open(args.config) as f:
            values = yaml.safe_load(f) or {}
        known = {f.name for f in dataclasses.fields(SFTConfig)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{args.config}: unknown keys {unknown}")
    values.update({k: v for k, v in vars(args).items()
                   if k not in ("command", "config") and v is not None})
    for key in ("dataset", "val_dataset", "mrl_dims"):
        if isinstance(values.get(key), (str, int)):
            values[key] = [values[key]]
    return SFTConfig(**values)


def run_sft(args) -> None:
    from megaemb.train import run_sft as train

    history = train(sft_config(args))
    _rank0_print(f"megaemb sft: done; eval before {history.get('eval_before')} "
                 f"after {history.get('eval_after')}")


def parse_size(text: str) -> int:
    units = {"KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40, "B": 1}
    for unit, mult in units.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * mult)
    return int(text)


def run_export(args) -> None:
    from megaemb import export
    from megaemb.config import ParallelConfig
    from megaemb.convert.verify import compare_with_transformers
    from megaemb.parallel import init_parallel

    if args.to_mcore == args.to_hf:
        raise SystemExit("megaemb export: give exactly one of --to_mcore true / --to_hf true")
    parallel = parallel_config(args)
    # --to_hf converts with TP=PP=EP=1; the parallel flags then only shape the precision test
    init_parallel(parallel if args.to_mcore else ParallelConfig(), seed=args.seed)
    if args.to_mcore:
        if not args.model:
            raise SystemExit("megaemb export --to_mcore true needs --model HF_DIR")
        loaded = export.hf_to_mcore(args.model, args.output_dir, parallel, bf16=args.bf16)
        hf_weights = args.model
    else:
        if not args.mcore_model:
            raise SystemExit("megaemb export --to_hf true needs --mcore_model DIR")
        export.mcore_to_hf(args.mcore_model, args.output_dir, bf16=args.bf16,
                           max_shard_bytes=parse_size(args.max_shard_size),
                           iteration=args.iteration, overwrite=args.overwrite)
        hf_weights = args.output_dir
        loaded = None
    _rank0_print(f"megaemb export: wrote {args.output_dir}")
    if args.test_convert_precision:
        if loaded is None:
            from megaemb.convert.load import load_model

            init_parallel(parallel, seed=args.seed)
            loaded = load_model(args.mcore_model, parallel, bf16=args.bf16)
        stats = compare_with_transformers(loaded.model, hf_weights, loaded.hf_dir)
        if stats:
            print(f"test_convert_precision: max_abs_diff={stats['max_abs_diff']:.3e} "
                  f"min_cosine={stats['min_cosine']:.8f}", flush=True)


def run_embed(args) -> None:
    import numpy as np

    from megaemb.convert.load import load_model
    from megaemb.data.tokenize import EmbeddingTokenizer
    from megaemb.embed import embed_texts, read_texts
    from megaemb.parallel import init_parallel

    texts = read_texts(args.input, args.text_field)
    parallel = parallel_config(args)
    init_parallel(parallel, seed=args.seed)
    loaded = load_model(args.model, parallel, bf16=args.bf16)
    tokenizer = EmbeddingTokenizer(loaded.hf_dir, args.max_length)
    result = embed_texts(loaded.model, tokenizer, texts, batch_size=args.batch_size,
                         instruction=args.instruction, dim=args.dim)
    if result is not None:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        np.save(args.output, result)
        print(f"megaemb embed: {result.shape[0]} texts -> {args.output} {result.shape}, "
              f"{tokenizer.truncated} truncated to --max_length {args.max_length}", flush=True)


def _rank0_print(msg: str) -> None:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(msg, flush=True)


COMMANDS = {"export": run_export, "embed": run_embed, "sft": run_sft}


def check_args(args) -> None:
    """Validate what the flags alone show, before any rank starts or any model loads.
    Raises ``ValueError`` with a one-line message."""


def main(argv: list[str] | None = None) -> int:
    from megaemb import launcher

    launcher.die_with_parent()  # first: a rank must not outlive its launcher
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        plan = launcher.launch_plan()
    except ValueError as e:
        print(f"megaemb {args.command}: error: {e}", file=sys.stderr, flush=True)
        return 2
    if plan is not None:
        return launcher.relaunch(plan, argv)
    from megaemb.convert.hf_to_mcore import ConversionError
    from megaemb.parallel import destroy_parallel

    try:
        COMMANDS[args.command](args)
    except (ConversionError, FileNotFoundError, FileExistsError, ValueError) as e:  # incl. DataError
        launcher.report_error(f"megaemb {args.command}: error: {e}")  # once per job, not per rank
        return 2
    finally:
        destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
