"""``megaemb`` command line: flags follow Megatron-SWIFT's spelling (``--to_mcore true``)."""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys

from megaemb import outputs


def str2bool(v: str) -> bool:
    """A true/false flag value (the bench scripts' flags)."""
    if isinstance(v, bool):
        return v
    if v.lower() in ("true", "1", "yes"):
        return True
    if v.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {v!r}")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``megaemb <cmd>: error: ...`` and exit code 2."""

    def error(self, message):
        command = next((a for a in sys.argv[1:] if a in COMMANDS), None)
        prog = self.prog if self.prog != "megaemb" or not command else f"megaemb {command}"
        self.exit(2, f"{prog}: error: {message} (see {prog} --help)\n")


def parallel_config(args):
    from megaemb.config import ParallelConfig

    return ParallelConfig.of(args)


DESCRIPTION = ("Train text-embedding models on Megatron-Core, convert them between Hugging Face and "
               "Megatron-Core, embed, evaluate, mine hard negatives and serve. Flags follow "
               "Megatron-SWIFT's spelling (--to_mcore true); 'megaemb COMMAND --help' lists a "
               "command's flags with their defaults.")


def command_flags() -> dict[str, tuple[type, ...]]:
    """Each subcommand but sft: the dataclasses whose fields are its flags, its own first (it
    documents a flag it shares, e.g. serve's --max_length)."""
    from megaemb.config import (EmbedFlags, EvalFlags, ExportFlags, InferenceFlags, MineFlags, ParallelFlags,
                                ServeFlags)

    return {"export": (ExportFlags, ParallelFlags),
            "embed": (EmbedFlags, InferenceFlags, ParallelFlags),
            "eval": (EvalFlags, InferenceFlags, ParallelFlags),
            "mine": (MineFlags, InferenceFlags, ParallelFlags),
            "serve": (ServeFlags, InferenceFlags, ParallelFlags)}


def build_parser() -> argparse.ArgumentParser:
    from megaemb.config import SFTConfig

    # allow_abbrev=False: a mistyped flag (--train_iter) is an error, never a silent prefix match
    parser = Parser(prog="megaemb", description=DESCRIPTION, allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name, classes in command_flags().items():
        summary = classes[0].__doc__.strip()
        add_dataclass_flags(sub.add_parser(name, help=summary, description=summary, allow_abbrev=False), classes)
    summary = "train an embedding model (contrastive losses)"
    s = sub.add_parser("sft", help=summary, description=summary, allow_abbrev=False)
    s.add_argument("--config", help="YAML with the same keys as the flags; flags override it (default: none)")
    add_dataclass_flags(s, (SFTConfig,), yaml=True)
    s.add_argument("--eval_dataset", dest="val_dataset", nargs="+", default=None,
                   help="alias of --val_dataset (default: none)")
    return parser


def add_dataclass_flags(p: argparse.ArgumentParser, classes: tuple[type, ...], yaml: bool = False) -> None:
    """One flag per field of ``classes`` (the first class to declare a name wins; each later
    class is a group titled by its docstring): type, choices and ``required`` from the field,
    help from its comment (``config.field_docs``) with the default shown. With ``yaml`` (sft)
    every default is None, so flags not given do not override the YAML. A field without a
    comment raises ``ValueError``: every flag is documented."""
    import dataclasses

    from megaemb.config import field_docs, field_kind

    taken = set()
    for i, cls in enumerate(classes):
        docs = field_docs(cls)
        target = p.add_argument_group(cls.__doc__.strip()) if i else p
        for f in dataclasses.fields(cls):
            if f.name in taken:
                continue
            taken.add(f.name)
            if not docs.get(f.name):
                raise ValueError(f"{cls.__name__}.{f.name}: no comment documents the flag --{f.name}")
            kind = field_kind(f)
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            required = f.metadata.get("required", False)
            target.add_argument(f"--{f.name}", type=_flag_type(kind), default=None if yaml else default,
                                required=required, nargs="+" if kind[1] else None,
                                choices=f.metadata.get("choices"),
                                metavar=None if "choices" in f.metadata else kind[0].upper(),
                                help=f"{docs[f.name]} ({_shown(default, kind, required)})".replace("%", "%%"))


def _shown(default, kind, required: bool) -> str:
    """How ``--help`` shows a flag's default."""
    if required:
        return "required"
    if default in (None, "", []):
        return "default: none"
    return f"default: {str(default).lower() if kind[0] == 'bool' else default}"


def _flag_type(kind):
    from megaemb.config import coerce

    scalar = (kind[0], False, kind[2])

    def convert(text: str):
        try:
            return coerce(text, scalar)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = kind[0]
    return convert


def read_yaml(path: str) -> dict:
    """A ``--config`` file as a mapping; one-line errors for a missing or malformed file."""
    import yaml

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config {path}: no such file")
    try:
        with open(path) as f:
            values = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ValueError(f"{path}: not valid YAML{where} ({getattr(e, 'problem', None) or e})") from None
    return {} if values is None else values


def sft_config(args):
    """Defaults < YAML (``--config``) < flags, each value coerced to its field's type."""
    import dataclasses

    from megaemb.config import SFTConfig

    cfg = SFTConfig.from_mapping(read_yaml(args.config) if args.config else {}, args.config or "flags")
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "config") and v is not None}
    # the run length is one choice: a flag for one of the two replaces the YAML's other
    if "train_iters" in flags and "num_train_epochs" not in flags:
        flags["num_train_epochs"] = 0.0
    if "num_train_epochs" in flags and "train_iters" not in flags:
        flags["train_iters"] = 0
    return dataclasses.replace(cfg, **flags)


def run_sft(args) -> None:
    from megaemb.train import run_sft as train

    history = train(sft_config(args))

    def show(metrics: dict) -> str:
        return ", ".join(f"{k} {float(v):.4f}" for k, v in metrics.items()) or "none"

    message = "megaemb sft: done"
    if history.get("eval_before"):
        message += f"; eval before: {show(history['eval_before'])}; after: {show(history['eval_after'])}"
    if history.get("hf_dir"):
        message += f"; HF model: {history['hf_dir']}"
    _rank0_print(message)


def parse_size(text: str) -> int:
    """``5GB``, ``500MB``, ``1024`` -> bytes (> 0)."""
    units = {"KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40, "B": 1}
    mult = next((m for unit, m in units.items() if text.upper().endswith(unit)), 1)
    number = text.upper().removesuffix(next((u for u in units if text.upper().endswith(u)), ""))
    try:
        size = int(float(number) * mult)
    except ValueError:
        size = 0
    if size <= 0:
        raise ValueError(f"--max_shard_size {text!r}: expected a positive size such as 5GB or 500MB")
    return size


def check_seq_cls_export(args, source: str) -> None:
    """``--to_seq_cls true``: an HF export of a generative reranker (LoRA: merged), or of a
    ``reranker`` (seq-cls already: nothing changes)."""
    from megaemb import checkpoint, tasks

    if not args.to_hf:
        raise ValueError("--to_seq_cls true needs --to_hf true")
    task = tasks.get(checkpoint.read_task(source))
    if not (task.causal_lm or task.seq_cls):
        raise ValueError(f"--to_seq_cls: --mcore_model {source} is a checkpoint of --task_type "
                         f"{checkpoint.read_task(source)}, not a generative reranker")
    if checkpoint.read_lora(source) and not args.merge_lora:
        raise ValueError("--to_seq_cls of a LoRA checkpoint needs --merge_lora true")


def run_export(args) -> None:
    from megaemb import export
    from megaemb.config import ParallelConfig
    from megaemb.convert.verify import compare_with_transformers
    from megaemb.parallel import init_parallel

    parallel = parallel_config(args)
    # --to_hf converts with TP=PP=EP=1; the parallel flags then only shape the precision test
    init_parallel(parallel if args.to_mcore else ParallelConfig(), seed=args.seed)
    if args.to_mcore:
        loaded = export.hf_to_mcore(args.model, args.output_dir, parallel, bf16=args.bf16,
                                    attention=args.attention, overwrite=args.overwrite)
        hf_weights = args.model
    else:
        export.mcore_to_hf(args.mcore_model, args.output_dir, bf16=args.bf16,
                           max_shard_bytes=parse_size(args.max_shard_size),
                           iteration=args.iteration, overwrite=args.overwrite,
                           merge_lora=args.merge_lora, allow_changed_base=args.allow_changed_base,
                           seq_cls=args.to_seq_cls)
        hf_weights = args.output_dir
        loaded = None
    _rank0_print(f"megaemb export: wrote {args.output_dir}")
    if args.test_convert_precision:
        if loaded is None:
            from megaemb.convert.load import load_model

            init_parallel(parallel, seed=args.seed)
            loaded = load_model(args.mcore_model, parallel, bf16=args.bf16, attention=args.attention,
                                allow_changed_base=args.allow_changed_base)
        stats = compare_with_transformers(loaded.model, hf_weights, loaded.hf_dir)
        if stats:
            print(f"test_convert_precision: max_abs_diff={stats['max_abs_diff']:.3e} "
                  f"min_cosine={stats['min_cosine']:.8f}", flush=True)


def run_embed(args) -> None:
    import numpy as np

    from megaemb.embed import embed_texts, read_texts

    texts = read_texts(args.input, args.text_field)
    loaded, tokenizer = _load_for_inference(args)
    result = embed_texts(loaded.model, tokenizer, texts, batch_size=args.batch_size,
                         instruction=args.instruction, dim=args.dim, packed=args.packing)
    if result is not None:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with outputs.atomic_file(args.output, "wb") as f:  # a file object: np.save would append .npy
            np.save(f, result)
        print(f"megaemb embed: {result.shape[0]} texts -> {args.output} {result.shape}, "
              f"{tokenizer.truncated} truncated to --max_length {args.max_length}", flush=True)


def _load_for_inference(args, task=None):
    """Parallel groups, the model (HF, MCore or LoRA checkpoint of ``task``, default an
    embedder: another task's checkpoint is refused) and its tokenizer, with ``--max_length``
    defaulting to the model's limit (a warning above it)."""
    from megaemb import preflight, tasks
    from megaemb.data.tokenize import EmbeddingTokenizer

    exported = None if task else preflight.exported_reranker(args.model)
    if exported:
        raise ValueError(f"--model {args.model}: a reranker export (--task_type {exported.name}); "
                         "this command takes an embedder")
    loaded = _load(args, args.model, task or tasks.EMBEDDING)
    return loaded, EmbeddingTokenizer(loaded.hf_dir, args.max_length)


def _load(args, path: str, task):
    """Parallel groups and the model at ``path`` built as ``task``, with ``--max_length``
    defaulting to the model's limit (a warning above it)."""
    from megaemb.convert.load import load_model
    from megaemb.parallel import init_parallel

    parallel = parallel_config(args)
    init_parallel(parallel, seed=args.seed)
    loaded = load_model(path, parallel, bf16=args.bf16, attention=args.attention,
                        allow_changed_base=args.allow_changed_base, task=task)
    if args.max_length is None:
        args.max_length = min(8192, loaded.shape.max_position_embeddings)
    if args.max_length > loaded.shape.max_position_embeddings:
        _rank0_print(f"warning: --max_length {args.max_length} is above the model's "
                     f"max_position_embeddings {loaded.shape.max_position_embeddings}")
    return loaded


def _encoder(args, path: str | None = None):
    """For eval / mine: ``encode(texts, instruction)`` (collective; rank 0 gets ``[n, h]``),
    the corpus ``EmbeddingCache`` and the loaded model: the embedder at ``path`` (default
    ``--model``)."""
    from megaemb.benchmark import EmbeddingCache
    from megaemb.embed import embed_texts

    path = path or args.model
    model_args = argparse.Namespace(**{**vars(args), "model": path})
    loaded, tokenizer = _load_for_inference(model_args)
    args.max_length = model_args.max_length

    def encode(texts, instruction):
        return embed_texts(loaded.model, tokenizer, texts, batch_size=args.batch_size,
                           instruction=instruction, packed=args.packing)

    cache = EmbeddingCache(args.cache_dir or default_cache("embeddings"), path, args.max_length)
    return encode, cache, loaded


def default_cache(kind: str) -> str:
    root = os.environ.get("MEGAEMB_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "megaemb")
    return os.path.join(root, kind)


def run_eval(args) -> None:
    import json

    import torch.distributed as dist

    from megaemb.benchmark import evaluate_set, flat, plot_dims, read_eval_set, table
    from megaemb.data.eval_sets import PairSet

    if args.retriever:
        return run_rerank_eval(args)
    data = read_eval_set(args.dataset)
    encode, cache, loaded = _encoder(args)
    pairs = isinstance(data, PairSet)
    first, second = (data.texts1, data.texts2) if pairs else (data.queries, data.corpus)
    queries = encode(first, args.instruction)
    docs, hit = cache.embed(encode, second) if not pairs else (encode(second, None), False)
    if dist.get_rank() != 0:
        return
    kind = "pairs" if pairs else "retrieval"
    width = loaded.shape.hidden_size
    dims = sorted(set(args.mrl_dims)) if args.mrl_dims else [None]
    results = evaluate_set(data, queries, docs, dims)
    size = f"{len(first)} pairs" if pairs else (f"{len(first)} queries, {len(second)} documents"
                                                 + (" (cached embeddings)" if hit else ""))
    print(f"megaemb eval: {args.model} on {' '.join(args.dataset)}: {size}\n{table(kind, results, width)}",
          flush=True)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with outputs.atomic_file(args.output) as f:  # NaN (Spearman of constant labels): null
            json.dump({k: None if isinstance(v, float) and v != v else v
                       for k, v in flat(kind, results, width).items()}, f, indent=2)
        if len(dims) > 1:
            plot_dims(kind, results, width, os.path.splitext(args.output)[0] + "_dims.png")


def run_rerank_eval(args) -> None:
    """``eval --retriever``: the retriever's top ``--top_k`` of each query (its corpus
    embeddings cached as ``eval``'s), reordered by the reranker ``--model``'s scores; the
    metrics of both rankings (``benchmark.rerank_results``). The retriever is freed before
    the reranker loads."""
    import gc
    import json

    import torch.distributed as dist

    from megaemb import preflight
    from megaemb.benchmark import read_eval_set, rerank_results, table
    from megaemb.evaluate import search

    data = read_eval_set(args.dataset)
    encode, cache, _ = _encoder(args, args.retriever)
    queries = encode(data.queries, args.query_instruction)
    docs, hit = cache.embed(encode, data.corpus)
    del encode, cache
    gc.collect()
    top = [search(queries, docs, args.top_k)[0] if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(top, src=0)
    loaded = _load(args, args.model, preflight.model_task(args.model))
    scorer = loaded.task.make_pair_scorer(loaded.model, loaded.hf_dir, args.max_length, args.instruction)
    scores = scorer.score(data.queries, [[data.corpus[j] for j in row] for row in top[0]],
                          source=f"--dataset {' '.join(args.dataset)}", batch_size=args.batch_size,
                          packed=args.packing)
    if dist.get_rank() != 0:
        return
    results = rerank_results(data.relevant, len(data.corpus), top[0], scores)
    k = top[0].shape[1]
    print(f"megaemb eval: {args.model} reranking the top {k} of {args.retriever} on "
          f"{' '.join(args.dataset)}: {len(data.queries)} queries, {len(data.corpus)} documents"
          + (" (cached embeddings)" if hit else "") + f"\n{table('rerank', results, k)}", flush=True)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with outputs.atomic_file(args.output) as f:
            json.dump({"kind": "rerank", "top_k": k, **results}, f, indent=2)


def run_mine(args) -> None:
    import torch.distributed as dist

    from megaemb.data.eval_sets import infonce_corpus
    from megaemb.data.formats import load_examples
    from megaemb.mine import mine_negatives, parse_range, write_mined

    lo, hi = parse_range(args.range)
    examples, _ = load_examples(args.dataset, "infonce")
    corpus, positives = infonce_corpus(examples)
    encode, cache, _ = _encoder(args)
    queries = encode([e.query for e in examples], args.instruction)
    docs, _ = cache.embed(encode, list(corpus))
    if dist.get_rank() != 0:
        return
    negatives = mine_negatives(queries, docs, [corpus[e.response] for e in examples],
                               [positives[e.query] for e in examples], num_negatives=args.num_negatives,
                               lo=lo, hi=hi, margin=args.margin)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    write_mined(args.output, [(e.query, e.response) for e in examples], list(corpus), negatives)
    short = sum(len(n) < args.num_negatives for n in negatives)
    print(f"megaemb mine: {len(examples)} rows, corpus of {len(corpus)} documents -> {args.output}: "
          f"{sum(map(len, negatives)) / len(negatives):.2f} negatives per row (ranks {lo + 1}-{hi}, "
          f"margin {args.margin}); {short} rows with fewer than {args.num_negatives}", flush=True)


def serve_task(args):
    """The task ``serve`` builds: ``--task_type``, else the model's (``preflight.model_task``);
    a checkpoint recorded for another task than ``--task_type``, or a flag
    the task refuses, is a one-line ValueError."""
    from megaemb import checkpoint, preflight, tasks

    if args.task_type and checkpoint.is_checkpoint(args.model):
        checkpoint.check_task(args.model, args.task_type, "--model")
    task = tasks.get(args.task_type) if args.task_type else preflight.model_task(args.model)
    for name, why in task.unsupported:
        if getattr(args, name, None):
            raise ValueError(f"--{name} is not supported with --task_type {task.name}: {why}")
    return task


def run_serve(args) -> None:
    from megaemb.serve import ServeConfig, serve

    task = serve_task(args)
    loaded, tokenizer = _load_for_inference(args, task)
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    cfg = ServeConfig(name=name, width=loaded.shape.hidden_size, max_length=args.max_length,
                      vocab_size=loaded.shape.vocab_size, end_id=tokenizer.end_id,
                      max_batch_texts=args.max_batch_texts, batch_wait_ms=args.batch_wait_ms)
    parse = task.make_serve_parser(loaded.hf_dir, cfg, args.instruction)
    packed = loaded.model.packs_by_default if args.packing is None else args.packing
    serve(loaded.model, cfg, parse, host=args.host, port=args.port, pad_id=tokenizer.pad_id,
          packed=packed, micro_batch_size=args.batch_size, task=task)


def _rank0_print(msg: str) -> None:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(msg, flush=True)


COMMANDS = {"export": run_export, "embed": run_embed, "eval": run_eval, "mine": run_mine,
            "serve": run_serve, "sft": run_sft}


def _check_inference(args, world: int, positive: tuple[str, ...] = (), dims: list[int] = (),
                     dims_flag: str = "") -> None:
    """embed / eval / mine / serve: sizes >= 1, the model (a LoRA checkpoint: its unchanged
    base), the layout (and Matryoshka ``dims``) it can take, packing."""
    from megaemb import checkpoint, preflight
    from megaemb.config import check_packing

    for name in ("batch_size", "max_length", *positive):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    preflight.check_model(args.model)
    checkpoint.check_lora_base(args.model, "--model", args.allow_changed_base)
    preflight.check_layout(args.model, parallel_config(args), world, dims, dims_flag)
    check_packing(args.packing, args.attention)


def check_rerank_eval(args, world: int) -> None:
    """``eval --retriever``: --model scores pairs (a reranker), --retriever embeds (an
    embedder, loadable under the layout), the dataset is a retrieval set."""
    from megaemb import checkpoint, preflight
    from megaemb.data.eval_sets import has_float_labels, is_beir
    from megaemb.data.formats import parse_spec

    preflight.check_model(args.retriever, "--retriever")
    checkpoint.check_lora_base(args.retriever, "--retriever", args.allow_changed_base)
    preflight.check_layout(args.retriever, parallel_config(args), world)
    model, retriever = preflight.model_task(args.model), preflight.model_task(args.retriever)
    if not model.pair_scorer:
        raise ValueError(f"--model {args.model}: an embedder (--task_type {model.name}); with "
                         "--retriever, --model is the reranker that reorders its top --top_k")
    if retriever.pair_scorer:
        raise ValueError(f"--retriever {args.retriever}: a reranker (--task_type {retriever.name}); "
                         "--retriever takes an embedder")
    if args.mrl_dims:
        raise ValueError("--mrl_dims: with --retriever the retriever is evaluated at its full width")
    first = parse_spec(args.dataset[0])[0]
    if not is_beir(first) and os.path.exists(first) and has_float_labels(first):
        raise ValueError(f"--dataset {args.dataset[0]}: labelled pairs have no retrieval to rerank; "
                         "give a BEIR folder or infonce rows")


def check_args(args, world: int = 1) -> None:
    """Validate what the flags, the environment (``world`` processes) and the files show,
    before any rank starts or any model loads. Raises ``ValueError`` / ``OSError`` subclasses
    with a one-line message."""
    from megaemb import checkpoint, preflight

    if args.command == "sft":
        cfg = sft_config(args)
        cfg.validate()
        preflight.check_model(cfg.model)
        if checkpoint.is_checkpoint(cfg.model):  # before any rank reads the data
            checkpoint.check_task(cfg.model, cfg.task_type, "--model")
        preflight.check_layout(cfg.model, cfg.parallel(), world, cfg.mrl_dims, "--mrl_dims")
        dp = world // cfg.parallel().model_parallel_size
        cfg.check_batch(dp)
        if cfg.train_type == "lora" and "experts" in cfg.target_modules \
                and not preflight.model_shape(cfg.model).num_experts:
            raise ValueError(f"--target_modules experts: --model {cfg.model} has no MoE experts")
        preflight.check_datasets(cfg.dataset, "--dataset")
        preflight.check_eval_datasets(cfg.val_dataset, "--val_dataset")
        preflight.resolve_load(cfg)
    elif args.command == "export":
        if args.to_mcore == args.to_hf:
            raise ValueError("give exactly one of --to_mcore true / --to_hf true")
        source, flag = (args.model, "--model") if args.to_mcore else (args.mcore_model, "--mcore_model")
        if not source:
            raise ValueError(f"--to_{'mcore' if args.to_mcore else 'hf'} true needs {flag}")
        preflight.check_model(source, flag, None if args.to_mcore else args.iteration)
        if args.to_hf and not os.path.isfile(os.path.join(source, "megaemb.json")):
            raise FileNotFoundError(f"--mcore_model {source}: not a megaemb checkpoint (no megaemb.json)")
        if args.to_hf:
            from megaemb import checkpoint

            checkpoint.check_lora_base(source, flag, args.allow_changed_base)
        if args.to_seq_cls:
            check_seq_cls_export(args, source)
        if args.test_convert_precision:
            from megaemb import checkpoint, tasks
            from megaemb.shape import read_hf_config

            task = (tasks.get(checkpoint.read_task(source)) if args.to_hf
                    else tasks.of_hf_config(read_hf_config(source)))
            if task.head:
                raise ValueError(f"--test_convert_precision compares embeddings; {flag} {source} "
                                 f"is a checkpoint of --task_type {task.name}")
        if args.to_hf and not args.merge_lora:
            from megaemb.config import LoRAConfig

            lora = checkpoint.read_lora(source)
            if lora:
                LoRAConfig.from_json(lora["lora"]).check_peft_export(f"--mcore_model {source}")
        preflight.check_layout(source, parallel_config(args), world)
        preflight.check_export_dirs(source, args.output_dir, flag, args.overwrite)
        parse_size(args.max_shard_size)
    elif args.command == "eval":
        preflight.check_eval_datasets(args.dataset, "--dataset")
        if any(d < 1 for d in args.mrl_dims or []):
            raise ValueError(f"--mrl_dims must be positive, got {args.mrl_dims}")
        _check_inference(args, world, positive=("top_k",), dims=args.mrl_dims or [],
                         dims_flag="--mrl_dims")
        models = [("--model", args.model)]
        if args.retriever:
            check_rerank_eval(args, world)
            models.append(("--retriever", args.retriever))
        else:
            if args.query_instruction is not None:
                raise ValueError("--query_instruction is the retriever's: it needs --retriever")
            task = preflight.model_task(args.model)
            if task.pair_scorer:
                raise ValueError(f"--model {args.model}: a reranker (--task_type {task.name}); "
                                 "give --retriever EMBEDDER, whose top --top_k it reranks")
        if args.output:
            preflight.check_output_file(args.output, "--output", models, args.overwrite)
            if len(set(args.mrl_dims or [])) > 1:
                preflight.check_output_file(os.path.splitext(args.output)[0] + "_dims.png", "the plot of --output",
                                            [("--model", args.model)], args.overwrite)
    elif args.command == "mine":
        from megaemb.data.eval_sets import has_float_labels, is_beir
        from megaemb.data.formats import parse_spec
        from megaemb.mine import parse_range

        _check_inference(args, world, positive=("num_negatives",))
        parse_range(args.range)
        if not args.margin > 0:
            raise ValueError(f"--margin must be > 0, got {args.margin}")
        preflight.check_datasets(args.dataset, "--dataset")
        inputs = [("--model", args.model)] + [("--dataset", parse_spec(d)[0]) for d in args.dataset]
        preflight.check_output_file(args.output, "--output", inputs, args.overwrite)
        for spec in args.dataset:
            path = parse_spec(spec)[0]
            if is_beir(path):
                raise ValueError(f"--dataset {spec}: a BEIR folder; mine reads infonce rows (query, "
                                 "response[, rejected_response]) and mines from their responses")
            if os.path.exists(path) and has_float_labels(path):
                raise ValueError(f"--dataset {spec}: rows have a 'label' (pairs); mine reads infonce "
                                 "rows (query, response, rejected_response), whose responses are positives")
    elif args.command == "serve":
        _check_inference(args, world, positive=("max_batch_texts",))
        serve_task(args)
        if not 0 <= args.port < 65536:
            raise ValueError(f"--port must be in [0, 65535], got {args.port}")
        if os.environ.get("RANK", "0") == "0":  # where the server will listen (ranks check at once)
            import socket

            with socket.socket() as probe:
                try:
                    probe.bind((args.host, args.port))
                except OSError as e:
                    raise ValueError(f"--host {args.host} --port {args.port}: cannot listen there "
                                     f"({e.strerror})") from None
    elif args.command == "embed":
        _check_inference(args, world, positive=("dim",), dims=[args.dim] if args.dim else [], dims_flag="--dim")
        from megaemb.embed import check_input

        check_input(args.input)
        preflight.check_output_file(args.output, "--output", [("--input", args.input), ("--model", args.model)],
                                    args.overwrite)


def main(argv: list[str] | None = None) -> int:
    from megaemb import launcher

    has_parent = launcher.die_with_parent()  # first: a rank must not outlive its launcher
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        plan = launcher.launch_plan()  # the environment first: it decides who runs the checks
    except ValueError as e:
        launcher.report_error(f"megaemb {args.command}: error: {e}")
        return 2
    if plan is None and not has_parent:  # runs the command itself, started from a shell
        launcher.reap_descendants_on_exit()  # before torch is imported (it forks)
    from megaemb import platform

    platform.quiet_megatron_warnings()  # before megatron is imported
    with contextlib.ExitStack() as held:
        try:
            world = plan.nproc_per_node * plan.nnodes if plan else int(os.environ.get("WORLD_SIZE", 1))
            output = job_output(args) if owns_outputs(plan, has_parent) else None
            if output:  # first: a second job hears that the output is busy, not what it sees there
                outputs.check_free(*output)
            check_args(args, world)
            if output:
                held.enter_context(outputs.owned(*output, f"megaemb {args.command}"))
        except (ValueError, OSError) as e:
            launcher.report_error(f"megaemb {args.command}: error: {e}")
            return 2
        if plan is not None:
            return launcher.relaunch(plan, argv)
        return run_command(args)


def job_output(args) -> tuple[str, bool, str] | None:
    """What the command writes and must own alone: ``(path, lock inside it, flag + path)``."""
    if args.command == "sft":
        save = sft_config(args).save
        return (save, True, f"--save {save}") if save else None
    if args.command == "export":
        return args.output_dir, False, f"--output_dir {args.output_dir}"
    if args.command in ("embed", "eval", "mine") and args.output:
        return args.output, False, f"--output {args.output}"
    return None


def owns_outputs(plan, has_parent: bool) -> bool:
    """Whether this process holds the job's output lock: the launcher of node 0, or a process
    running the command without a megaemb launcher above it (rank 0 under an outside torchrun)."""
    if has_parent:  # a rank (or rank 0's export child) of a megaemb launcher, which holds it
        return False
    if plan is not None:
        return plan.node_rank == 0
    return os.environ.get("RANK", "0") == "0"


def run_command(args) -> int:
    """Run the command in this process (a rank); user errors and a full disk end in one line."""
    from megaemb import launcher, platform

    note = platform.fallback_note()
    if note and int(os.environ.get("RANK") or 0) == 0:  # once per job
        print(note, file=sys.stderr, flush=True)
    from megaemb.convert.hf_to_mcore import ConversionError
    from megaemb.parallel import destroy_parallel

    try:
        COMMANDS[args.command](args)
    except (ConversionError, FileNotFoundError, FileExistsError, PermissionError,
            ValueError, TimeoutError) as e:  # incl. DataError; TimeoutError: peers never joined
        launcher.report_error(f"megaemb {args.command}: error: {e}")  # once per job, not per rank
        return 2
    except KeyboardInterrupt:  # Ctrl-C of a command run in this process: one line, not a traceback
        launcher.report_error(f"megaemb {args.command}: stopped by SIGINT")
        return 128 + signal.SIGINT
    except Exception as e:
        full = outputs.disk_full(e)
        if full is None:
            raise
        launcher.report_error(f"megaemb {args.command}: error: {outputs.full_message(full)}")
        return 2
    finally:
        destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
