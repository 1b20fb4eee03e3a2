"""``megaemb sft``: contrastive training of an ``EmbeddingModel`` with megatron-core.

One optimizer step = ``global_batch_size`` examples, chosen by ``GlobalBatchSampler`` from
(data, seed, global batch) only and split evenly over data-parallel replicas. A rank's
groups become texts laid out as ``megaemb.data.batching.group_texts`` says::

    infonce:        [q_1..q_m, p_1..p_m, n_11..n_1k, ..., n_m1..n_mk]   (m*(2+k) texts)
    pair losses:    [q_1..q_m, d_1..d_m]                                (2m texts)

and ``megaemb.step`` runs their forward and backward passes: per micro-batch losses, or with
``--global_negatives`` the loss of the whole global batch by gradient caching. This module
is the loop around it: set-up, the optimizer step, evaluation, logs and checkpoints.
"""
from __future__ import annotations

import datetime
import os
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import (DistributedDataParallel, DistributedDataParallelConfig,
                                       finalize_model_grads)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megaemb import checkpoint, launcher, platform, preflight, tasks
from megaemb.config import LoRAConfig, SFTConfig, fused_targets_note
from megaemb.convert.load import load_model
from megaemb.data.batching import group_texts
from megaemb.data.eval_sets import PairSet, RetrievalSet, first_queries, is_beir, read_beir, rows_as_set
from megaemb.data.formats import load_examples
from megaemb.data.sampler import GlobalBatchSampler, shard_for_rank
from megaemb.data.token_store import StoreSpec, open_on_every_rank
from megaemb.data.tokenize import EmbeddingTokenizer, format_query
from megaemb.embed import embed_texts
from megaemb.evaluate import pair_metrics, retrieval_metrics
from megaemb.logs import TrainLogger, micro_batch_note
from megaemb.loss import GroupLoss, InfoNCEConfig
from megaemb.model.flops import train_flops
from megaemb.model.lora import is_lora_name
from megaemb.parallel import init_parallel
from megaemb.step import Layout, cached_chunks, cached_step, plain_micro_batch_size, plain_step

OPTIMIZER_CKPT_FORMAT = {"distrib_optim_sharding_type": "fully_reshardable"}


def _opt_bool(text: str) -> bool | None:
    return None if text == "" else text.lower() in ("1", "true", "yes")


def infonce_config(cfg: SFTConfig) -> InfoNCEConfig:
    """Flags win over INFONCE_* environment variables, which win over defaults."""
    return InfoNCEConfig.from_env(
        temperature=cfg.infonce_temperature, hard_negatives=cfg.infonce_hard_negatives,
        use_batch=_opt_bool(cfg.infonce_use_batch),
        mask_fake_negative=_opt_bool(cfg.infonce_mask_fake_negative),
        include_qq=_opt_bool(cfg.infonce_include_qq), include_dd=_opt_bool(cfg.infonce_include_dd))


class Trainer:
    def __init__(self, cfg: SFTConfig):
        cfg.validate()
        preflight.check_model(cfg.model)
        self.load_dir = preflight.resolve_load(cfg)
        if not cfg.save and int(os.environ.get("RANK", 0)) == 0:
            print("megaemb sft: warning: no --save: the trained weights will not be kept",
                  file=sys.stderr, flush=True)
        self.cfg = cfg
        self.task = tasks.get(cfg.task_type)
        self.parallel = cfg.parallel()
        init_parallel(self.parallel, seed=cfg.seed,
                      timeout_s=round(cfg.distributed_timeout_minutes * 60))
        self.rank0 = dist.get_rank() == 0
        self.dp = parallel_state.get_data_parallel_world_size()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        cfg.check_batch(self.dp)
        self.wait_group = dist.new_group(  # rank 0's HF export: see export_hf
            backend="gloo", timeout=datetime.timedelta(minutes=cfg.export_timeout_minutes))
        self._build_model()
        self._build_data()
        self._build_optimizer()
        self.logger = TrainLogger(cfg.save if self.rank0 else "", enabled=self.rank0)

    # ------------------------------------------------------------------ setup
    def _build_model(self):
        cfg = self.cfg
        if cfg.bf16 is None:
            cfg.bf16 = platform.default_bf16()
        overlap = cfg.overlap_grad_reduce
        if overlap is None:
            overlap = platform.default_overlap_grad_reduce(self.dp)
        self.lora = LoRAConfig.of(cfg) if cfg.train_type == "lora" else None
        self.loaded = load_model(cfg.model, self.parallel, bf16=cfg.bf16, attention=cfg.attention,
                                 recompute_granularity=cfg.recompute_granularity or None,
                                 recompute_method=cfg.recompute_method,
                                 recompute_num_layers=cfg.recompute_num_layers,
                                 hidden_dropout=cfg.hidden_dropout,
                                 attention_dropout=cfg.attention_dropout, lora=self.lora, seed=cfg.seed,
                                 task=self.task)
        self.module = self.loaded.model
        self.module.train()
        # what lora.json records: the base's weights, read before training (resumes compare it)
        self.base_fingerprint = checkpoint.weights_fingerprint(cfg.model) if self.lora else None
        if self.lora:
            trained = sum(p.numel() for p in self.module.parameters() if p.requires_grad)
            frozen = sum(p.numel() for p in self.module.parameters() if not p.requires_grad)
            self._log(f"LoRA r={self.lora.rank} alpha={self.lora.alpha} on {', '.join(self.lora.target_modules)}: "
                      f"{trained:,} trained parameters, {frozen:,} frozen (no gradient buffer or "
                      "optimizer state) on this rank")
            note = fused_targets_note(cfg.target_modules)
            if note:
                self._log(f"note: {note}")
        if cfg.hidden_dropout or cfg.attention_dropout:
            self._log(f"dropout: hidden {cfg.hidden_dropout}, attention {cfg.attention_dropout}")
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=overlap,
            use_distributed_optimizer=cfg.use_distributed_optimizer)
        self.model = DistributedDataParallel(self.module.config, ddp_config, self.module)
        config = self.module.config
        # run by the schedule after the last backward: all-reduces grads over data-parallel
        # ranks (and SP layernorm / PP embedding grads); without it DP replicas diverge
        config.finalize_model_grads_func = finalize_model_grads
        if overlap:
            # the schedule holds bucket all-reduces back until the last micro-batch's
            # backward (no_sync), then DDP starts each bucket as its gradients are ready
            config.no_sync_func = self.model.no_sync
            config.grad_sync_func = self.model.start_grad_sync
        self._log(f"bf16 {cfg.bf16}, overlap_grad_reduce {overlap}")
        if not self.task.own_data:  # a task's own data brings its loss (_build_task_data)
            self.loss_cfg = infonce_config(cfg) if cfg.loss_type == "infonce" else None
            self.loss = GroupLoss(cfg.loss_type, self.loss_cfg, cfg.margin, tuple(cfg.mrl_dims))

    def _build_data(self):
        """Training rows come from the token store (built once per node; see
        ``megaemb.data.token_store``), never as text; eval rows are text."""
        cfg = self.cfg
        self.tokenizer = EmbeddingTokenizer(self.loaded.hf_dir, cfg.max_length)
        if cfg.max_length > self.loaded.shape.max_position_embeddings:
            self._log(f"warning: --max_length {cfg.max_length} is above the model's "
                      f"max_position_embeddings {self.loaded.shape.max_position_embeddings}")
        if self.task.own_data:
            return self._build_task_data()
        spec = StoreSpec(datasets=tuple(cfg.dataset), loss_type=cfg.loss_type, bad_rows=cfg.bad_rows,
                         seed=cfg.seed, split_dataset_ratio=cfg.split_dataset_ratio,
                         hard_negatives=self.loss_cfg.hard_negatives if self.loss_cfg else None,
                         max_length=cfg.max_length, query_instruction=cfg.query_instruction,
                         tokenizer_dir=self.loaded.hf_dir)
        self.train = open_on_every_rank(spec, cfg.token_cache_dir(), verbose=self.rank0)
        self.train.check_vocab(self.loaded.shape.vocab_size, cfg.model)
        meta = self.train.meta
        self._log(f"train data: {self.train.report.summary()}")
        for msg in self.train.report.messages:
            self._log(f"  skipped: {msg}")
        self.eval_set = self._eval_set()
        if cfg.loss_type == "infonce":
            low, high = meta["negatives_per_row"]
            self._log(f"infonce: {meta['k']} hard negatives per query (rows have {low}..{high}; "
                      f"{meta['topped_up']} rows topped up by resampling)")
        self._log(f"tokenized {len(self.train)} examples; {meta['truncated']} texts truncated "
                  f"to --max_length {cfg.max_length}")
        self._build_schedule()
        if cfg.loss_type == "infonce":
            self._log_negatives(meta["k"])

    def _build_task_data(self):
        """A task's own training rows and eval rows (``Task.train_data``; ``--val_dataset``
        or ``--split_dataset_ratio``'s held-out rows)."""
        self.train = self.task.make_train_data(self.cfg, self.tokenizer.tokenizer, self._log)
        self.eval_set = self.train.eval_rows or None
        self._build_schedule()

    def _build_schedule(self):
        """Sampler, step count, batch layout and the prefetch thread, over ``self.train``."""
        cfg = self.cfg
        cfg.check_examples(len(self.train))
        self.sampler = GlobalBatchSampler(len(self.train), cfg.global_batch_size, cfg.seed)
        self.train_iters = cfg.train_iters or self.sampler.iterations_for_epochs(cfg.num_train_epochs)
        self.packed = self.module.packs_by_default if cfg.packing is None else cfg.packing
        self.layout = Layout(self.tokenizer.pad_id, self.packed, self.module.sequence_multiple)
        self._builder = ThreadPoolExecutor(1, thread_name_prefix="megaemb-next-step")
        self._ahead: tuple[int, Future] | None = None  # (step, its inputs being built)
        self._log(micro_batch_note(self.packed, cfg.max_tokens_per_micro_batch))
        self._log(f"batches count {self.task.batch_unit}: {cfg.global_batch_size} per step, "
                  + (f"{cfg.global_batch_size // self.dp} per data-parallel rank, as many per "
                     "micro-batch as fit --max_tokens_per_micro_batch"
                     if cfg.max_tokens_per_micro_batch else
                     f"{cfg.micro_batch_size} per micro-batch and rank"))

    def _log_negatives(self, k: int) -> None:
        """How many groups (and so negatives) each InfoNCE loss sees."""
        cfg = self.cfg
        if cfg.global_negatives:
            seen, how = cfg.global_batch_size, "the global batch, --global_negatives"
        elif cfg.max_tokens_per_micro_batch:
            seen, how = cfg.global_batch_size, ("at most; micro-batch x data parallel size, each "
                                                 "micro-batch as many groups as fit the token budget")
        else:
            seen, how = cfg.micro_batch_size * self.dp, ("micro-batch x data parallel size; "
                                                          "--global_negatives true would make it the "
                                                          "global batch")
        self.negatives = self.loss.negatives_per_query(seen, k)
        up_to = "up to " if cfg.max_tokens_per_micro_batch and not cfg.global_negatives else ""
        self._log(f"infonce: {up_to}{self.negatives} negatives per query (the loss sees {seen} "
                  f"groups: {how})")

    def _eval_set(self) -> RetrievalSet | PairSet | None:
        """What the in-loop eval scores: a BEIR folder as ``megaemb eval`` reads it, the
        ``--val_dataset`` rows or the held-out rows of ``--split_dataset_ratio`` (None: no eval);
        ``--eval_limit`` keeps the first queries / rows."""
        cfg = self.cfg
        if cfg.val_dataset and is_beir(cfg.val_dataset[0]):  # alone and whole (preflight)
            data = first_queries(read_beir(cfg.val_dataset[0]), cfg.eval_limit)
            self._log(f"eval data: BEIR {cfg.val_dataset[0]}: {len(data.queries)} queries, "
                      f"{len(data.corpus)} documents")
            return data
        if cfg.val_dataset:
            rows, report = load_examples(cfg.val_dataset, cfg.loss_type, bad_rows=cfg.bad_rows, seed=cfg.seed)
            self._log(f"eval data: {report.summary()}")
            rows = rows[: cfg.eval_limit] if cfg.eval_limit else rows
        else:
            rows = self.train.held_out(cfg.eval_limit)
        return rows_as_set(rows, cfg.loss_type) if rows else None

    def _build_optimizer(self):
        cfg = self.cfg
        opt_config = OptimizerConfig(
            optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
            adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, clip_grad=cfg.clip_grad,
            bf16=cfg.bf16, params_dtype=torch.bfloat16 if cfg.bf16 else torch.float32,
            use_distributed_optimizer=cfg.use_distributed_optimizer)
        self.optimizer = get_megatron_optimizer(opt_config, [self.model])
        warmup = int(cfg.lr_warmup_fraction * self.train_iters)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if warmup else cfg.lr, max_lr=cfg.lr, min_lr=cfg.min_lr,
            lr_warmup_steps=warmup, lr_decay_steps=self.train_iters, lr_decay_style=cfg.lr_decay_style,
            start_wd=cfg.weight_decay, end_wd=cfg.weight_decay, wd_incr_steps=self.train_iters,
            # a resumed run follows this run's flags (e.g. a raised --train_iters extends the
            # schedule) from the checkpoint's step, not the schedule the checkpoint was made with
            override_opt_param_scheduler=True, use_checkpoint_opt_param_scheduler=False,
            wd_incr_style="constant")
        self.start_step = 0
        if self.load_dir:
            self._load(self.load_dir)

    # ------------------------------------------------------------------ checkpoints
    def _layout(self) -> dict:
        """Saved with every checkpoint. RNG states depend on tp/pp/ep (one state per (PP, TP)
        rank, shared by DP replicas); the optimizer state's format on the optimizer kind."""
        return {"tp": self.parallel.tensor_model_parallel_size,
                "pp": self.parallel.pipeline_model_parallel_size,
                "ep": self.parallel.expert_model_parallel_size,
                "distributed_optimizer": self.cfg.use_distributed_optimizer}

    def _model_state(self) -> dict:
        """The model's sharded state dict; a LoRA run's holds only the adapters (the base is
        ``lora.json``'s model)."""
        state = self.module.sharded_state_dict()
        return {k: v for k, v in state.items() if is_lora_name(k)} if self.lora else state

    def _lora_record(self) -> dict | None:
        return {"base": os.path.abspath(self.cfg.model), "base_fingerprint": self.base_fingerprint,
                "lora": self.lora.to_json()} if self.lora else None

    def _state(self, is_loading: bool, with_rng: bool = True) -> dict:
        model_sd = self._model_state()
        state = dict(model_sd)  # model keys at top level: same layout as `export --to_mcore`
        if not self.cfg.finetune or not is_loading:
            # fully_reshardable: the distributed optimizer saves per-parameter state in the plain
            # optimizer's format, so any TP/PP/DP layout and either optimizer kind can load it
            # (megatron 0.16's default, fully_sharded_model_space, fails to save at all)
            state["optimizer"] = self.optimizer.sharded_state_dict(
                model_sd, is_loading=is_loading, metadata=OPTIMIZER_CKPT_FORMAT)
            state["opt_param_scheduler"] = self.scheduler.state_dict()
            state["iteration"] = self.step
            state["layout"] = self._layout()
            if with_rng:
                state["rng_state"] = checkpoint.rng_state_object()
        return state

    def _load(self, root: str):
        """Resume (model, optimizer, scheduler, iteration, RNG) or, with ``--finetune``, take
        the weights only. Any TP/PP/EP/DP layout loads any other; RNG states are per (PP, TP)
        rank, so under another layout the generators are reseeded from ``--seed`` instead."""
        self.step = 0
        saved, now = checkpoint.saved_layout(root) or {}, self._layout()
        if not self.cfg.finetune and saved.get("distributed_optimizer", now["distributed_optimizer"]) \
                != now["distributed_optimizer"]:
            raise ValueError(
                f"--load {root}: saved with --use_distributed_optimizer "
                f"{str(saved['distributed_optimizer']).lower()}; resume with the same setting (any "
                "TP/PP/EP/DP layout works), or take its weights only with --finetune true")
        if not self.cfg.finetune:
            _create_optimizer_state(self.optimizer)
        # --finetune too: a LoRA run takes adapters, a full run full weights (a full checkpoint
        # under LoRA is a --model)
        checkpoint.check_task(root, self.task.name, "--load")
        checkpoint.check_lora_matches(root, self.lora.to_json() if self.lora else None)
        checkpoint.check_lora_base(root, "--load", self.cfg.allow_changed_base, base=self.cfg.model)
        same_layout = all(saved.get(k) == now[k] for k in ("tp", "pp", "ep"))
        state = checkpoint.load_checkpoint(root, self._state(is_loading=True, with_rng=same_layout))
        self.module.load_state_dict({k: state[k] for k in self._model_state()}, strict=not self.lora)
        if self.cfg.finetune:
            # the optimizer copied fp32 main params from the --model weights when it was built
            # (bf16): refresh them from the loaded weights, or the first step restores the old ones
            self.optimizer.reload_model_params()
            self._log(f"loaded weights of {root} (--finetune: new optimizer, scheduler, iteration 0)")
            return
        self.optimizer.load_state_dict(state["optimizer"])
        saved_schedule = state["opt_param_scheduler"]
        self.scheduler.load_state_dict(saved_schedule)
        if saved_schedule.get("lr_decay_steps") != self.train_iters:
            self._log(f"note: {root} was scheduled over {saved_schedule.get('lr_decay_steps')} "
                      f"iterations; the learning-rate schedule now spans --train_iters {self.train_iters}")
        self.start_step = int(state["iteration"])
        if self.start_step > self.train_iters:
            raise ValueError(f"--load {root} is at iteration {self.start_step}, past --train_iters "
                             f"{self.train_iters}")
        if same_layout:
            checkpoint.restore_rng_state(state["rng_state"])
        else:
            self._log(f"note: {root} was saved under another parallel layout "
                      f"({saved or 'not recorded'} vs {now}): RNG states reseeded "
                      f"from --seed {self.cfg.seed} (only dropout, if any, differs from an "
                      "uninterrupted run)")
        self._log(f"resuming from {root} at iteration {self.start_step}")

    def save(self):
        path = checkpoint.save_checkpoint(self.cfg.save, self.step, self._state(is_loading=False),
                                          self.loaded.hf_dir, lora=self._lora_record(),
                                          task=self.task.name)
        self._log(f"saved {path}")
        if self.cfg.save_hf:
            self.export_hf(path + "_hf", iteration=self.step)
        if self.rank0 and self.cfg.save_total_limit:
            for old in checkpoint.prune_checkpoints(self.cfg.save, self.cfg.save_total_limit):
                self._log(f"removed {old} (--save_total_limit {self.cfg.save_total_limit})")

    def export_hf(self, out: str, iteration: int | None = None):
        """HF + sentence-transformers export of a saved iteration.

        The conversion needs TP=PP=EP=1 process groups, so global rank 0 runs it as a
        single-process ``megaemb export`` (streamed: one checkpoint tensor at a time) with no
        launcher variables (torchrun's, Slurm's), while the other ranks wait on a gloo group
        whose timeout is ``--export_timeout_minutes`` (a large export outlasts the default
        collective timeout); rank 0 then sends them the outcome, so a failure stops them all."""
        error = None
        if dist.get_world_size() > 1:
            self._log(f"exporting {out} on rank 0; the other ranks wait up to "
                      f"{self.cfg.export_timeout_minutes:g} min (--export_timeout_minutes)")
        if self.rank0:
            cmd = [sys.executable, "-m", "megaemb.cli", "export", "--mcore_model", self.cfg.save,
                   "--to_hf", "true", "--output_dir", out, "--overwrite", "true",
                   "--bf16", str(self.cfg.bf16)] + (["--merge_lora", "true"] if self.lora else [])
            if iteration is not None:
                cmd += ["--iteration", str(iteration)]
            result = subprocess.run(cmd, env=launcher.child_env(single_process_env()),
                                    capture_output=True, text=True)
            if result.returncode == 2:  # its one-line user error (a full disk, ...): pass it on as one
                error = ValueError(f"HF export to {out}: "
                                   f"{result.stderr.strip().splitlines()[-1].split('error: ', 1)[-1]}")
            elif result.returncode:
                error = RuntimeError(f"HF export of {self.cfg.save} failed:\n{result.stderr[-3000:]}")
            else:
                self._log(f"exported {out}")
        outcome = [error]
        dist.broadcast_object_list(outcome, src=0, group=self.wait_group)
        if outcome[0]:
            raise outcome[0]

    # ------------------------------------------------------------------ one step
    def step_inputs(self, step: int) -> tuple[list, list | None]:
        """What step ``step`` needs that involves no collective (so a helper thread may build
        it while the accelerator runs the step before): this rank's rows, read from the token
        store (a task with its own data: the rows' groups it draws for the step), and for the
        plain step its micro-batches (pinned on CUDA)."""
        indices = shard_for_rank(self.sampler.indices_for_step(step), self.dp_rank, self.dp)
        if self.task.own_data:
            rows = self.train.draw(indices, step)
        else:
            rows = [self.train[i] for i in indices]
        if self.cfg.global_negatives or self.cfg.max_tokens_per_micro_batch:
            return rows, None  # cut in the step (a token budget is agreed by a collective)
        return rows, self._micro_batches(rows, self.cfg.micro_batch_size)

    def _micro_batches(self, rows: list, size: int) -> list:
        """This rank's ``rows`` of a step, ``size`` rows per micro-batch."""
        if self.task.own_data:
            return self.train.micro_batches(rows, size, self.layout)
        return self.layout.micro_batches(rows, size)

    def _row_texts(self, rows: list) -> list[list]:
        """Each row's token sequences, for the token budget (``plain_micro_batch_size``)."""
        if self.task.own_data:
            return self.train.texts(rows)
        return [group_texts([r])[0] for r in rows]

    def _inputs_of(self, step: int) -> tuple[list, list | None]:
        """Step ``step``'s inputs: prefetched, else built now; then step ``step + 1``'s start
        building on the helper thread (the next step's packs are built while this one runs)."""
        ahead, self._ahead = self._ahead, None
        inputs = ahead[1].result() if ahead and ahead[0] == step else self.step_inputs(step)
        if step + 1 < self.train_iters:
            self._ahead = (step + 1, self._builder.submit(self.step_inputs, step + 1))
        return inputs

    def forward_backward(self, rows: list, micro: list | None = None):
        """This rank's ``rows`` of the step (and the plain step's micro-batches, when built
        already) -> ``step.StepOutput``; gradients in DDP's buffers."""
        cfg = self.cfg
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        if cfg.global_negatives:
            chunks = cached_chunks(rows, self.layout, micro_batch_size=cfg.micro_batch_size,
                                   max_tokens=cfg.max_tokens_per_micro_batch)
            return cached_step(self.model, rows, chunks, self.loss, self.layout)
        if micro is None:
            size = cfg.micro_batch_size
            if cfg.max_tokens_per_micro_batch:  # a collective: never on the prefetch thread
                size = plain_micro_batch_size(self._row_texts(rows), self.layout,
                                              cfg.max_tokens_per_micro_batch)
            micro = self._micro_batches(rows, size)
        if self.task.own_data:  # the task's loss, weighted by the step's groups
            return plain_step(self.model, micro, self.train.step_loss(
                micro, parallel_state.get_data_parallel_group()))
        return plain_step(self.model, micro, self.loss.of_batch)

    def train_step(self) -> dict:
        out = self.forward_backward(*self._inputs_of(self.step))
        lr = self.scheduler.get_lr(self.optimizer.param_groups[0])  # the lr this step used
        ok, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        loss = _average_loss(out.loss.to(platform.device()))
        lengths = [int(n) for b in out.batches for n in b.lengths]
        computed = sum(b.input_ids.numel() for b in out.batches)
        stats = {"loss": loss, "grad_norm": float(grad_norm or 0.0), "lr": lr,
                 "samples": self.cfg.global_batch_size, "tokens": sum(lengths) * self.dp,
                 "padding": 1 - sum(lengths) / computed, "micro_batches": len(out.batches),
                 "flops": train_flops(self.loaded.shape, lengths, self.task.head_rows) * self.dp}
        if out.replay_error is not None:
            stats["replay_error"] = out.replay_error
        return stats

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict:
        """Retrieval or pair metrics of ``eval_set`` (queries with ``--query_instruction``), or
        a task's own (``Task.train_data``'s ``evaluate``)."""
        data = self.eval_set
        if data is None:
            return {}
        if self.task.own_data:  # the task's metrics, the same on every rank
            metrics = self.train.evaluate(self.module, self.layout)
            self.module.train()
            return metrics
        pairs = isinstance(data, PairSet)
        first, second = (data.texts1, data.texts2) if pairs else (data.queries, data.corpus)
        q = embed_texts(self.module, self.tokenizer, [format_query(t, self.cfg.query_instruction or None)
                                                      for t in first], packed=self.packed)
        d = embed_texts(self.module, self.tokenizer, second, packed=self.packed)
        if not self.rank0:
            metrics = {}
        else:
            metrics = pair_metrics(q, d, data.labels) if pairs else retrieval_metrics(q, d, data.relevant)
        self.module.train()
        box = [metrics]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    # ------------------------------------------------------------------ loop
    def run(self) -> dict:
        """Train from ``start_step`` to ``train_iters``; a run already there only evaluates."""
        cfg = self.cfg
        self.step = self.start_step
        finished = self.start_step == self.train_iters
        if finished:
            self._log(f"nothing to train: {self.load_dir} is at iteration {self.start_step} "
                      f"= --train_iters (raise --train_iters to train on)")
        history = {"eval_before": self.evaluate()}
        self.logger.log_eval(self.step, history["eval_before"])
        progress = self.logger.progress(self.start_step, self.train_iters)
        window, t0 = [], time.time()
        for self.step in range(self.start_step, self.train_iters):
            stats = self.train_step()
            window.append(stats)
            self.logger.record_loss(self.step + 1, stats["loss"])
            progress.update(1)
            progress.set_postfix(loss=f"{stats['loss']:.4f}")
            done = self.step + 1
            if done % cfg.log_interval == 0 or done == self.train_iters:
                elapsed, t0 = time.time() - t0, time.time()
                self.logger.log_interval(done, window, elapsed)
                window = []
            if cfg.eval_interval and done % cfg.eval_interval == 0 and done != self.train_iters:
                self.logger.log_eval(done, self.evaluate())
            if cfg.save and cfg.save_interval and done % cfg.save_interval == 0:
                self.step = done
                self.save()
        self.step = self.train_iters
        progress.close()
        if finished:
            history["eval_after"] = history["eval_before"]
        else:
            history["eval_after"] = self.evaluate()
            self.logger.log_eval(self.step, history["eval_after"])
        if cfg.save:
            if not finished and not (cfg.save_interval and self.train_iters % cfg.save_interval == 0):
                self.save()
            self.logger.finish()
        history["finished_before"] = finished
        history["losses"] = self.logger.losses
        return history

    def _log(self, msg: str):
        if self.rank0:
            print(msg, flush=True)


# torchrun's variables (and TORCHELASTIC_*, e.g. USE_AGENT_STORE), the launcher's and the
# schedulers' (SLURM_*): the export subprocess must start its own one-process job, not join
# this one nor relaunch itself as this job's multi-node torchrun
_RANK_ENV = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
             "GROUP_WORLD_SIZE", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_PORT", "MASTER_ADDR",
             "NPROC_PER_NODE", "NNODES", "NODE_RANK"}
_JOB_ENV_PREFIXES = ("TORCHELASTIC_", "SLURM_", "PMI_", "OMPI_")


def single_process_env(env=os.environ) -> dict:
    """``env`` for a child that must run as one plain process, whatever the scheduler."""
    out = {k: v for k, v in env.items()
           if k not in _RANK_ENV and not k.startswith(_JOB_ENV_PREFIXES)}
    out.update(NPROC_PER_NODE="1", NNODES="1", NODE_RANK="0")
    return out


def _create_optimizer_state(optimizer) -> None:
    """torch's Adam creates its state (``exp_avg``, ``step``, ...) at the first step, but the
    distributed optimizer's checkpoint format needs it before a load: megatron's own helper
    takes one step on zero gradients (the values are then overwritten by the load)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if hasattr(opt, "_init_optimizer_states_with_dummy_values"):  # DistributedOptimizer
            opt._init_optimizer_states_with_dummy_values()


def _average_loss(loss: torch.Tensor) -> float:
    """The step's loss (known on the last pipeline stage) averaged over data-parallel ranks."""
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        if not parallel_state.is_pipeline_last_stage():
            loss = torch.zeros_like(loss)
        dist.all_reduce(loss, group=parallel_state.get_pipeline_model_parallel_group())
    dist.all_reduce(loss, group=parallel_state.get_data_parallel_group())
    return loss.item() / parallel_state.get_data_parallel_world_size()


def run_sft(cfg: SFTConfig) -> dict:
    """Train; with ``--save``, end with an HF export of the last checkpoint in
    ``<save>/hf_model`` and the run's summary in ``<save>/metrics.json``."""
    trainer = Trainer(cfg)
    history = trainer.run()
    if cfg.save:
        history["hf_dir"] = os.path.join(cfg.save, "hf_model")
        if not (history["finished_before"] and os.path.isdir(history["hf_dir"])):
            trainer.export_hf(history["hf_dir"])
        losses = history["losses"]
        trainer.logger.write_metrics({
            "iteration": trainer.step, "last_step_loss": losses[-1][1] if losses else None,
            "eval_before": history["eval_before"], "eval_after": history["eval_after"],
            "hf_model": history["hf_dir"]})
    return history
