"""Typed configuration shared by every subcommand (flag names follow Megatron-SWIFT)."""
from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import asdict, dataclass, field

from megaemb import tasks


@dataclass
class ParallelConfig:
    """How one model replica is split. Data parallel size = world / (tp * pp * cp)."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    context_parallel_size: int = 1
    sequence_parallel: bool = False

    def __post_init__(self):
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                     "expert_model_parallel_size", "context_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.context_parallel_size > 1:
            raise ValueError("--context_parallel_size > 1 is not supported yet (it needs Transformer "
                             "Engine attention and batches split along the sequence)")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            self.sequence_parallel = False  # as in Megatron: meaningless without TP

    @classmethod
    def of(cls, flags) -> "ParallelConfig":
        """From any object with the parallel flags as attributes (parsed args, ``SFTConfig``)."""
        return cls(**{f.name: getattr(flags, f.name) for f in dataclasses.fields(cls)})

    @property
    def model_parallel_size(self) -> int:
        return (self.tensor_model_parallel_size * self.pipeline_model_parallel_size
                * self.context_parallel_size)

    def check_world_size(self, world: int) -> None:
        """``ValueError`` unless ``world`` processes fit every product megatron-core's
        ``initialize_model_parallel`` divides the world by: the dense layers' TP x PP x CP
        (x DP) and the experts' ETP x EP x PP (x expert DP; megaemb's ETP is the TP size)."""
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        cp, ep = self.context_parallel_size, self.expert_model_parallel_size
        for names, sizes in ((("tensor", "pipeline", "context"), (tp, pp, cp)),
                             (("expert tensor (= tensor)", "expert", "pipeline"), (tp, ep, pp))):
            product = sizes[0] * sizes[1] * sizes[2]
            if world % product:
                raise ValueError(
                    f"{world} processes are not a multiple of {' x '.join(names)} parallel size "
                    f"{' x '.join(map(str, sizes))} = {product} (set NPROC_PER_NODE / NNODES, or the "
                    "parallel sizes)")


# ------------------------------------------------------------------ the other subcommands' flags
# One flag per field, documented by the comment ending its line (``field_docs``), shown with its
# default; ``cli.add_dataclass_flags`` builds the parsers from these. ``REQUIRED`` marks a flag
# that must be given; ``choices(...)`` limits a flag's values.

REQUIRED = {"required": True}


def choices(*values: str) -> dict:
    """Field metadata: the flag takes only these values."""
    return {"choices": values}


@dataclass
class ParallelFlags:
    """parallelism (world size = NPROC_PER_NODE * NNODES)"""

    tensor_model_parallel_size: int = 1  # TP: layers split over this many GPUs
    pipeline_model_parallel_size: int = 1  # PP: layers in this many stages
    expert_model_parallel_size: int = 1  # EP: MoE experts spread over this many ranks
    context_parallel_size: int = 1  # CP (needs Transformer Engine attention; only 1 is supported yet)
    sequence_parallel: bool = False  # SP: split norms/activations over TP ranks along the sequence
    bf16: bool = False  # bf16 weights (false: fp32)
    seed: int = 42  # random seed (the model's initialisation)
    attention: str = field(default="auto", metadata=choices("auto", "te", "sdpa", "local"))  # layer spec: te (Transformer Engine), sdpa, local; auto = te when installed


@dataclass
class InferenceFlags:
    """model and batching"""

    model: str = field(default="", metadata=REQUIRED)  # HF model dir or megaemb MCore checkpoint dir (LoRA too)
    max_length: int | None = None  # tokens per text, end token included (longer texts are cut); none = 8192 or the model's max_position_embeddings
    batch_size: int = 32  # texts per forward micro-batch (sorted by length first)
    packing: bool | None = None  # padding-free micro-batches (the texts in one row); none = true on CUDA, false on CPU
    allow_changed_base: bool = False  # a LoRA checkpoint whose base model now holds other weights than its adapters were trained on: use it knowingly (refused by default)


@dataclass
class ExportFlags:
    """convert HF <-> Megatron-Core checkpoints"""

    model: str | None = None  # HF model directory (with --to_mcore)
    mcore_model: str | None = None  # megaemb MCore checkpoint directory (with --to_hf)
    to_mcore: bool = False  # convert --model to a Megatron-Core checkpoint under the parallel layout
    to_hf: bool = False  # convert --mcore_model to HF (transformers + sentence-transformers files)
    output_dir: str = field(default="", metadata=REQUIRED)  # directory to write (never the input)
    test_convert_precision: bool = False  # compare the converted model with transformers on sample texts
    max_shard_size: str = "5GB"  # HF safetensors shard size (--to_hf), e.g. 500MB
    iteration: int | None = None  # checkpoint iteration to export with --to_hf; none = the latest
    overwrite: bool = False  # replace an existing, non-empty --output_dir
    to_seq_cls: bool = False  # --to_hf of a generative reranker: Qwen3ForSequenceClassification (score.weight = W[yes] - W[no]) instead of Qwen3ForCausalLM (a --task_type reranker checkpoint is always that)
    merge_lora: bool = False  # --to_hf of a LoRA checkpoint: the merged HF model (false: a PEFT adapter folder)
    allow_changed_base: bool = False  # a LoRA checkpoint whose base model now holds other weights than its adapters were trained on: use it knowingly (refused by default)


@dataclass
class EmbedFlags:
    """embed texts with an HF or MCore checkpoint"""

    input: str = field(default="", metadata=REQUIRED)  # .txt (a text per line), or --text_field of each row of .jsonl, .json, .csv, .parquet or a datasets folder
    output: str = field(default="", metadata=REQUIRED)  # file to write (exactly this path): .npy format, float32 [n, dim]
    overwrite: bool = False  # replace an existing --output
    text_field: str = "text"  # the field holding the text (all but .txt)
    instruction: str | None = None  # task for 'Instruct: {task}\nQuery:{text}'; none = the texts as they are
    dim: int | None = None  # Matryoshka dimension (the first DIM coordinates, renormalised); none = all


@dataclass
class EvalFlags:
    """retrieval / STS metrics of an HF or MCore checkpoint"""

    dataset: list[str] = field(default_factory=list, metadata=REQUIRED)  # a BEIR folder (corpus.jsonl, queries.jsonl, qrels/*.tsv), infonce rows (query/response/rejected_response) or pairs with float labels; FILE#N samples N rows
    instruction: str | None = None  # task for 'Instruct: {task}\nQuery:{query}' (with --retriever: the reranker's <Instruct>); none = the queries as they are (the reranker's default instruction)
    mrl_dims: list[int] | None = None  # Matryoshka dimensions: one row each, and a PNG beside --output; none = the full width
    output: str | None = None  # metrics JSON (flat keys: recall@10, ndcg@10, ...; with --retriever a 'retriever' and a 'reranked' block); none = the table only
    overwrite: bool = False  # replace an existing --output
    cache_dir: str | None = None  # corpus embeddings by content hash; none = $MEGAEMB_CACHE/embeddings or ~/.cache/megaemb/embeddings
    retriever: str | None = None  # an embedder (HF dir or MCore checkpoint) whose top --top_k the reranker --model reorders; none = --model is an embedder, evaluated alone
    top_k: int = 100  # with --retriever: candidates per query the reranker scores (a positive outside them is a miss)
    query_instruction: str | None = None  # with --retriever: the retriever's task for 'Instruct: {task}\nQuery:{query}'; none = the queries as they are


@dataclass
class MineFlags:
    """hard negatives from a dataset's own corpus -> infonce JSONL"""

    dataset: list[str] = field(default_factory=list, metadata=REQUIRED)  # infonce rows (query/response[/rejected_response]); FILE#N samples N rows
    output: str = field(default="", metadata=REQUIRED)  # JSONL to write: query, response, rejected_response
    overwrite: bool = False  # replace an existing --output
    num_negatives: int = 7  # hard negatives per row
    range: str = "10-100"  # LO-HI: candidates ranked LO+1..HI by similarity (skips the LO closest)
    margin: float = 0.95  # drop candidates scoring above MARGIN x the positive's score (false negatives)
    instruction: str | None = None  # task for 'Instruct: {task}\nQuery:{query}'; none = the queries as they are
    cache_dir: str | None = None  # corpus embeddings by content hash (as eval); none = $MEGAEMB_CACHE/embeddings or ~/.cache/megaemb/embeddings


@dataclass
class ServeFlags:
    """OpenAI-compatible /v1/embeddings server (an embedder), or /v1/rerank (a reranker)"""

    host: str = "127.0.0.1"  # address to listen on (0.0.0.0: every interface)
    port: int = 8000  # TCP port; 0 picks a free port (printed)
    served_model_name: str | None = None  # the model id clients send; none = the --model directory's name
    max_batch_texts: int = 256  # dynamic batching: most texts of concurrent requests run together
    batch_wait_ms: float = 5.0  # dynamic batching: how long a first request waits for others
    max_length: int | None = None  # longest input in tokens, end token included; longer ones get a 400 (a reranker's prompt: its document is cut to fit); none = 8192 or the model's max_position_embeddings
    batch_size: int = 32  # texts per forward micro-batch
    task_type: str | None = None  # embedding (POST /v1/embeddings) | generative_reranker (POST /v1/rerank); none = what a megaemb checkpoint records, embedding for an HF model
    instruction: str | None = None  # rerankers: the prompt's <Instruct> when a request gives no 'instruction'; none = Qwen3-Reranker's default


@dataclass
class SFTConfig:
    """``megaemb sft`` settings. Every field is a flag of the same name (Megatron-SWIFT
    spelling) and a key of the optional ``--config`` YAML; flags override the YAML."""

    model: str = ""  # HF model dir (Qwen3 / Qwen3-Embedding / Qwen3-MoE) or megaemb checkpoint
    dataset: list[str] = field(default_factory=list)  # training files or folders; FILE#N samples N rows
    val_dataset: list[str] = field(default_factory=list)  # eval files (retrieval or pair metrics) or a BEIR folder
    split_dataset_ratio: float = 0.0  # hold out this share of --dataset for eval instead
    task_type: str = "embedding"  # embedding | generative_reranker (Qwen3-Reranker: yes/no logits at the last token) | reranker (Qwen3ForSequenceClassification: one logit)
    loss_type: str = "infonce"  # embedding: infonce | cosine_similarity | contrastive | online_contrastive; generative_reranker, reranker: pointwise_reranker | listwise_reranker | listwise_distill_reranker (KL to every row's teacher 'scores')
    bad_rows: str = "error"  # error (stop at file:line) | skip (count in the log)
    max_length: int = 512  # tokens per text, end token included (longer texts are cut)
    query_instruction: str = ""  # task for 'Instruct: {task}\nQuery:{query}'; documents get none
    instruction: str = ""  # rerankers: the prompt's <Instruct> (a row's system message wins); none = Qwen3-Reranker's default
    data_cache_dir: str = ""  # tokenised-data stores, reused across runs; none = $MEGAEMB_CACHE or ~/.cache/megaemb/tokens
    # parallelism
    tensor_model_parallel_size: int = 1  # TP: layers split over this many GPUs
    pipeline_model_parallel_size: int = 1  # PP: layers in this many stages
    expert_model_parallel_size: int = 1  # EP: MoE experts spread over this many ranks
    context_parallel_size: int = 1  # CP (needs Transformer Engine attention)
    sequence_parallel: bool = False  # SP: split norms/activations over TP ranks along the sequence
    attention: str = "auto"  # auto | te | sdpa | local (layer spec; auto = te when installed)
    packing: bool | None = None  # padding-free [1, T] micro-batches; none = true on CUDA
    # batch and schedule
    micro_batch_size: int = 1  # rows per forward pass and rank: embedding, groups (query, positive, negatives); reranker, queries with all their candidates
    global_batch_size: int = 16  # rows (embedding: groups; reranker: queries) per optimizer step over all data-parallel ranks
    global_negatives: bool = False  # InfoNCE over the whole global batch by gradient caching (one extra forward)
    max_tokens_per_micro_batch: int = 0  # cut micro-batches by tokens, not rows (plain step: the most rows that fit; a row is never split); 0 = by --micro_batch_size
    train_iters: int = 0  # optimizer steps (or give --num_train_epochs)
    num_train_epochs: float = 0.0  # passes over --dataset (or give --train_iters)
    lr: float = 1e-5  # peak learning rate
    min_lr: float = 0.0  # learning rate at the end of the decay
    lr_warmup_fraction: float = 0.0  # share of the steps with linear warm-up
    lr_decay_style: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.1  # AdamW weight decay
    adam_beta1: float = 0.9  # Adam beta1
    adam_beta2: float = 0.95  # Adam beta2
    clip_grad: float = 1.0  # gradient-norm clipping
    use_distributed_optimizer: bool = False  # shard optimizer state over data-parallel ranks
    overlap_grad_reduce: bool | None = None  # overlap DP gradient reduction with backward; none = on CUDA with DP > 1
    bf16: bool | None = None  # bf16 weights (fp32 main params, pooling and loss); none = true on CUDA
    recompute_granularity: str = ""  # activation recompute: full | selective; none = off
    recompute_method: str = "uniform"  # with full: uniform (every layer, in chunks of --recompute_num_layers) | block (only the first --recompute_num_layers layers of each stage)
    recompute_num_layers: int = 1  # with full: layers per recomputed chunk (uniform) or recomputed layers per stage (block)
    hidden_dropout: float = 0.0  # dropout after attention and MLP (Qwen3 trains without)
    attention_dropout: float = 0.0  # dropout of attention probabilities
    seed: int = 42  # data order, negatives, initialisation
    # LoRA (ms-swift's flags)
    train_type: str = "full"  # full | lora (frozen base, trained low-rank adapters)
    lora_rank: int = 8  # adapter rank r
    lora_alpha: float = 32.0  # adapter scale alpha (the update is alpha / r * B A)
    lora_dropout: float = 0.05  # dropout on the adapters' input
    allow_changed_base: bool = False  # resume / --finetune a LoRA --load although --model holds other weights than its adapters were trained on
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])  # all-linear (dense linears), experts (MoE experts, opt-in), or linear_qkv linear_proj linear_fc1 linear_fc2 (q_proj ... down_proj map onto them)
    # loss
    infonce_temperature: float | None = None  # InfoNCE temperature; none = INFONCE_TEMPERATURE or 0.01
    infonce_hard_negatives: int | None = None  # hard negatives per query; none = INFONCE_HARD_NEGATIVES or all
    infonce_use_batch: str = ""  # in-batch negatives from all DP ranks (true | false; "" = env or true)
    infonce_mask_fake_negative: str = ""  # mask candidates scoring above the positive (true | false)
    infonce_include_qq: str = ""  # add query-query similarities (true | false)
    infonce_include_dd: str = ""  # add document-document similarities (true | false)
    margin: float = 0.5  # margin of the contrastive / online_contrastive losses
    mrl_dims: list[int] = field(default_factory=list)  # Matryoshka dimensions, e.g. 64 128 256
    # checkpoints, evaluation, logs
    save: str = ""  # run directory: checkpoints, logs, hf_model/, metrics.json (resumed if it holds a run)
    load: str = ""  # checkpoint to resume; none = --save
    finetune: bool = False  # take only the weights of --load (new optimizer, step 0)
    save_interval: int = 0  # save every N steps (0: at the end only)
    save_hf: bool = False  # also export HF files at every save
    save_total_limit: int = 0  # keep only the newest N checkpoints (and their HF exports); 0 = all
    eval_interval: int = 0  # evaluate every N steps (0: before and after training only)
    eval_limit: int = 0  # eval rows (or BEIR queries) used (0: all)
    log_interval: int = 10  # steps per log line (loss, tokens/s, MFU, memory)
    export_timeout_minutes: float = 240.0  # other ranks wait this long for rank 0's HF export
    distributed_timeout_minutes: float = 10.0  # a collective waiting longer ends the job

    def parallel(self) -> ParallelConfig:
        return ParallelConfig.of(self)

    def token_cache_dir(self) -> str:
        """Where token stores live: ``--data_cache_dir``, else ``$MEGAEMB_CACHE``, else
        ``~/.cache/megaemb/tokens``."""
        return os.path.expanduser(self.data_cache_dir or os.environ.get("MEGAEMB_CACHE")
                                  or "~/.cache/megaemb/tokens")

    @classmethod
    def from_mapping(cls, values: dict, source: str) -> "SFTConfig":
        """Build from YAML / flag values, coercing each to its field's type; unknown keys and
        values of the wrong type raise ``ValueError("<source>: <key>: expected ...")``."""
        if not isinstance(values, dict):
            raise ValueError(f"{source}: expected a mapping of flag names to values, "
                             f"got {type(values).__name__}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"{source}: unknown keys {unknown}")
        out = {}
        for key, value in values.items():
            try:
                out[key] = coerce(value, field_kind(known[key]))
            except ValueError as e:
                raise ValueError(f"{source}: {key}: {e}") from None
        return cls(**out)

    def validate(self) -> None:
        """Every check the flags alone allow (no files read); ``ValueError`` with one line."""
        if not self.model:
            raise ValueError("--model is required (HF dir or megaemb checkpoint)")
        if not self.dataset:
            raise ValueError("--dataset is required")
        task = tasks.get(self.task_type)
        choices = {"loss_type": task.losses,
                   "train_type": ("full", "lora"),
                   "bad_rows": ("error", "skip"), "lr_decay_style": ("cosine", "linear", "constant"),
                   "recompute_granularity": ("", "full", "selective"),
                   "recompute_method": ("uniform", "block"),
                   "attention": ("auto", "te", "sdpa", "local")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                default = getattr(type(self), name, None)
                hint = (f" with --task_type {task.name} ({default!r} is the default, the embedder's)"
                        if name == "loss_type" and getattr(self, name) == default else "")
                raise ValueError(f"--{name} {getattr(self, name)!r}: expected one of "
                                 f"{', '.join(repr(a) for a in allowed)}{hint}")
        for name, why in task.unsupported:
            if getattr(self, name):
                raise ValueError(f"--{name} is not supported with --task_type {task.name}: {why}")
        for name in ("train_iters", "num_train_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0 (0: unset), got {getattr(self, name)}")
        if (self.train_iters > 0) == (self.num_train_epochs > 0):
            raise ValueError("give exactly one of --train_iters and --num_train_epochs")
        positive = ("micro_batch_size", "global_batch_size", "max_length", "log_interval",
                    "tensor_model_parallel_size", "pipeline_model_parallel_size",
                    "expert_model_parallel_size", "context_parallel_size", "export_timeout_minutes",
                    "distributed_timeout_minutes", "recompute_num_layers")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name} must be > 0, got {getattr(self, name)}")
        for name in ("train_iters", "num_train_epochs", "save_interval", "save_total_limit",
                     "max_tokens_per_micro_batch",
                     "eval_interval", "eval_limit", "weight_decay", "clip_grad", "min_lr"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.max_length < 2:
            raise ValueError(f"--max_length must be >= 2 (a text and the end token), got {self.max_length}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.min_lr > self.lr:
            raise ValueError(f"--min_lr {self.min_lr} is above --lr {self.lr}")
        if not 0 <= self.lr_warmup_fraction < 1:
            raise ValueError(f"--lr_warmup_fraction must be in [0, 1), got {self.lr_warmup_fraction}")
        if not 0 <= self.split_dataset_ratio < 1:
            raise ValueError(f"--split_dataset_ratio must be in [0, 1), got {self.split_dataset_ratio}")
        if self.split_dataset_ratio and self.val_dataset:
            raise ValueError("give --val_dataset or --split_dataset_ratio, not both")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        if self.infonce_temperature is not None and not self.infonce_temperature > 0:
            raise ValueError(f"--infonce_temperature must be > 0, got {self.infonce_temperature}")
        if self.infonce_hard_negatives is not None and self.infonce_hard_negatives < 0:
            raise ValueError(f"--infonce_hard_negatives must be >= 0, got {self.infonce_hard_negatives}")
        for name in ("infonce_use_batch", "infonce_mask_fake_negative", "infonce_include_qq",
                     "infonce_include_dd"):
            if getattr(self, name).lower() not in ("", "true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"--{name} {getattr(self, name)!r}: expected true or false")
        if any(d <= 0 for d in self.mrl_dims):
            raise ValueError(f"--mrl_dims must be positive, got {self.mrl_dims}")
        check_packing(self.packing, self.attention)
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        if (self.recompute_method, self.recompute_num_layers) != ("uniform", 1) \
                and self.recompute_granularity != "full":
            raise ValueError("--recompute_method / --recompute_num_layers need "
                             "--recompute_granularity full")
        if self.max_tokens_per_micro_batch and self.max_tokens_per_micro_batch < self.max_length:
            raise ValueError(f"--max_tokens_per_micro_batch {self.max_tokens_per_micro_batch} is "
                             f"below --max_length {self.max_length} (one text must fit)")
        if self.train_type == "lora":
            if self.lora_rank < 1 or not self.lora_alpha > 0 or not 0 <= self.lora_dropout < 1:
                raise ValueError(f"LoRA needs --lora_rank >= 1, --lora_alpha > 0 and --lora_dropout in "
                                 f"[0, 1), got {self.lora_rank}, {self.lora_alpha}, {self.lora_dropout}")
            target_modules(self.target_modules)
        if self.finetune and not self.load:
            raise ValueError("--finetune true needs --load CHECKPOINT (the weights to start from)")
        for name in ("save", "load", "model", "data_cache_dir"):
            if getattr(self, name) and not getattr(self, name).strip():
                raise ValueError(f"--{name} is blank")

    def check_batch(self, dp: int) -> None:
        """The global batch must split evenly over ``dp`` data-parallel ranks and, unless
        micro-batches are cut by tokens, into whole micro-batches on each."""
        if self.max_tokens_per_micro_batch:
            per_step, what = dp, f"the data parallel size {dp}"
        else:
            per_step = self.micro_batch_size * dp
            what = f"--micro_batch_size {self.micro_batch_size} x data parallel size {dp}"
        if self.global_batch_size % per_step:
            raise ValueError(f"--global_batch_size {self.global_batch_size} must be divisible by {what} "
                             f"(both count {tasks.get(self.task_type).batch_unit})")

    def check_examples(self, num_examples: int) -> None:
        """A step must not hold the training set more than once: ``--global_batch_size`` at
        most ``num_examples`` (after ``#N`` sampling and ``--split_dataset_ratio``); who wants
        repeats asks for them with ``path#N``."""
        if self.global_batch_size > num_examples:
            raise ValueError(f"--global_batch_size {self.global_batch_size} is larger than the {num_examples} "
                             f"training {tasks.get(self.task_type).batch_unit}: one step would hold "
                             "examples more than once; lower it, or repeat the data on purpose with "
                             "--dataset PATH#N (N examples)")


ALL_LINEAR = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
# what ms-swift / PEFT users name; megatron fuses q/k/v and gate/up into one linear each
HF_NAMES = {"q_proj": "linear_qkv", "k_proj": "linear_qkv", "v_proj": "linear_qkv",
            "o_proj": "linear_proj", "gate_proj": "linear_fc1", "up_proj": "linear_fc1",
            "down_proj": "linear_fc2"}


@dataclass(frozen=True)
class LoRAConfig:
    """Adapter settings of ``--train_type lora`` (``megaemb.model.lora``); saved as
    ``lora.json`` in a LoRA checkpoint."""

    rank: int = 8
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ALL_LINEAR

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def of(cls, cfg: "SFTConfig") -> "LoRAConfig":
        return cls(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, target_modules(cfg.target_modules))

    def attention(self, attention: str) -> str:
        """The layer spec for ``--attention``: ``auto`` takes the SDPA spec when experts are
        adapted (with Transformer Engine on CUDA, megatron holds experts in one
        ``TEGroupedMLP``, which has no per-expert linears to adapt)."""
        return "sdpa" if attention == "auto" and "experts" in self.target_modules else attention

    def to_json(self) -> dict:
        return {**asdict(self), "target_modules": list(self.target_modules)}

    def check_peft_export(self, where: str) -> None:
        """PEFT adapters exist for dense projections only."""
        if "experts" in self.target_modules:
            raise ValueError(f"{where}: its MoE experts have adapters, and transformers holds "
                             "Qwen3-MoE experts in fused 3-D parameters that PEFT cannot adapt: "
                             "export with --merge_lora true")

    @classmethod
    def from_json(cls, data: dict) -> "LoRAConfig":
        return cls(int(data["rank"]), float(data["alpha"]), float(data["dropout"]),
                   tuple(data["target_modules"]))


def target_modules(names: list[str]) -> tuple[str, ...]:
    """``--target_modules`` (``all-linear``, megatron or HF projection names) -> megatron names.
    Raises ``ValueError`` naming what cannot be targeted."""
    out: list[str] = []
    for name in names or ["all-linear"]:
        if name in ("all-linear", "all_linear"):
            wanted = ALL_LINEAR
        elif name in ALL_LINEAR:
            wanted = (name,)
        elif name in HF_NAMES:
            wanted = (HF_NAMES[name],)
        elif name == "experts":  # opt-in: every routed expert's linear_fc1 and linear_fc2
            wanted = ("experts",)
        else:
            raise ValueError(f"--target_modules {name!r}: expected all-linear, experts or some of "
                             f"{', '.join(ALL_LINEAR + tuple(HF_NAMES))}")
        out += [w for w in wanted if w not in out]
    return tuple(out)


def fused_targets_note(names: list[str]) -> str | None:
    """What HF projection names in ``--target_modules`` adapt beyond themselves: megatron fuses
    q/k/v into ``linear_qkv`` and gate/up into ``linear_fc1``, so one adapter covers them all
    (None when every fused name is listed, or none is given)."""
    extra = dict.fromkeys(hf for name in names or [] for hf, linear in HF_NAMES.items()
                          if linear == HF_NAMES.get(name) and hf not in names)
    if not extra:
        return None
    return (f"--target_modules {' '.join(names)} also adapts {', '.join(extra)}: megatron fuses q/k/v into "
            "linear_qkv and gate/up into linear_fc1, and one adapter covers each fused linear")


def field_docs(cls) -> dict[str, str]:
    """Each dataclass field's documentation: the comment ending its line in the class source
    (``name: type = default  # doc``); a field without one has none here (``cli`` refuses
    to build a flag without help)."""
    import inspect
    import io
    import tokenize

    docs = {}
    for token in tokenize.generate_tokens(io.StringIO(inspect.getsource(cls)).readline):
        field_name = re.match(r"\s*(\w+)\s*:", token.line[:token.start[1]])
        if token.type == tokenize.COMMENT and field_name:
            docs[field_name.group(1)] = token.string.lstrip("# ").strip()
    return docs


def check_packing(packing: bool | None, attention: str) -> None:
    if packing and attention == "local":
        raise ValueError("--packing true needs --attention sdpa, te or auto (megatron's local "
                         "attention has no document mask)")


def field_kind(f: dataclasses.Field) -> tuple[str, bool, bool]:
    """``(scalar type name, is_list, optional)`` of a config field, from its annotation."""
    kind = str(f.type).replace(" ", "")
    optional = kind.endswith("|None")
    kind = kind.removesuffix("|None")
    is_list = kind.startswith("list[")
    return (kind[5:-1] if is_list else kind), is_list, optional


def _scalar(value, kind: str):
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError(f"expected true or false, got {value!r}")
    if kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            return int(value)
        raise ValueError(f"expected an integer, got {value!r}")
    if kind == "float":
        try:
            number = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number):
            raise ValueError(f"expected a number, got {value!r}")
        return number
    if isinstance(value, (dict, list)):
        raise ValueError(f"expected a string, got {type(value).__name__}")
    return "" if value is None else str(value)


def coerce(value, kind: tuple[str, bool, bool]):
    """A YAML or flag value -> the field's type (YAML 1.1 reads ``6e-6`` as a string)."""
    scalar, is_list, optional = kind
    if value is None and optional:
        return None
    if is_list:
        values = value if isinstance(value, list) else [value]
        return [_scalar(v, scalar) for v in values]
    return _scalar(value, scalar)
