"""Typed configuration shared by every subcommand (flag names follow Megatron-SWIFT)."""
from __future__ import annotations

from dataclasses import dataclass, field


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

    @property
    def model_parallel_size(self) -> int:
        return (self.tensor_model_parallel_size * self.pipeline_model_parallel_size
                * self.context_parallel_size)


@dataclass
class SFTConfig:
    """``megaemb sft`` settings. Every field is a flag of the same name (Megatron-SWIFT
    spelling) and a key of the optional ``--config`` YAML; flags override the YAML."""

    model: str = ""
    dataset: list[str] = field(default_factory=list)
    val_dataset: list[str] = field(default_factory=list)
    split_dataset_ratio: float = 0.0
    loss_type: str = "infonce"  # infonce | cosine_similarity | contrastive | online_contrastive
    bad_rows: str = "error"  # error | skip
    max_length: int = 512
    query_instruction: str = ""
    # parallelism
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    attention: str = "auto"  # auto | te | sdpa | local (layer spec; auto = te when installed)
    # batch and schedule
    micro_batch_size: int = 1
    global_batch_size: int = 16
    train_iters: int = 0
    num_train_epochs: float = 0.0
    lr: float = 1e-5
    min_lr: float = 0.0
    lr_warmup_fraction: float = 0.0
    lr_decay_style: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = False
    bf16: bool = False
    recompute_granularity: str = ""  # "" | full | selective
    seed: int = 42
    # loss
    infonce_temperature: float = -1.0  # < 0: INFONCE_TEMPERATURE env var or 0.01
    infonce_hard_negatives: int = -1  # < 0: INFONCE_HARD_NEGATIVES env var or all
    infonce_use_batch: str = ""  # "" = env var or true
    infonce_mask_fake_negative: str = ""
    infonce_include_qq: str = ""
    infonce_include_dd: str = ""
    margin: float = 0.5
    mrl_dims: list[int] = field(default_factory=list)
    # checkpoints, evaluation, logs
    save: str = ""
    load: str = ""
    finetune: bool = False
    save_interval: int = 0
    save_hf: bool = False
    eval_interval: int = 0
    eval_limit: int = 0  # 0 = all eval rows
    log_interval: int = 10

    def validate(self) -> None:
        if not self.model:
            raise ValueError("--model is required (HF dir or megaemb checkpoint)")
        if not self.dataset:
            raise ValueError("--dataset is required")
        if self.loss_type not in ("infonce", "cosine_similarity", "contrastive", "online_contrastive"):
            raise ValueError(f"--loss_type {self.loss_type!r}: expected infonce, cosine_similarity, "
                             "contrastive or online_contrastive")
        if self.attention not in ("auto", "te", "sdpa", "local"):
            raise ValueError(f"--attention {self.attention}: expected auto, te, sdpa or local")
        if self.bad_rows not in ("error", "skip"):
            raise ValueError(f"--bad_rows {self.bad_rows!r}: expected error or skip")
        if (self.train_iters > 0) == (self.num_train_epochs > 0):
            raise ValueError("give exactly one of --train_iters and --num_train_epochs")
        if self.lr_decay_style not in ("cosine", "linear", "constant"):
            raise ValueError(f"--lr_decay_style {self.lr_decay_style!r}")
