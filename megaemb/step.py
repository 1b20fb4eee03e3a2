"""One training step's forward and backward passes over this rank's share of the global batch;
the optimizer step is the caller's.

Both kinds run micro-batches of texts through megatron's schedule
(``get_forward_backward_func``: 1F1B under PP), each micro-batch one ``TextBatch`` (padded
``[n, s]`` or packed ``[1, T]``), and end with parameter gradients in DDP's buffers, reduced
over data-parallel ranks once (``finalize_model_grads``). The loss is a ``GroupLoss`` of the
groups' embeddings, known on the last pipeline stage.

plain    (default) each micro-batch of ``m`` groups has its own loss, its in-batch candidates
         the micro-batch's groups of every data-parallel rank (``m x DP``); the step's
         gradient is the mean over micro-batches. ``m`` is ``--micro_batch_size``, or under a
         token budget the most groups that fit it (``plain_micro_batch_size``).
cached   (``--global_negatives``; GradCache, Gao et al. 2021) the loss of the whole global
         batch, exactly, holding the activations of one micro-batch at a time:
           1. forward only over every micro-batch, keeping its embeddings ``[n_i, d]`` and the
              RNG states it started from (``parallel.rng_states``);
           2. ``GroupLoss`` of all this rank's groups (candidates gathered over data-parallel
              ranks with gradient, as in the plain step), backward to the embeddings only:
              ``grad [n, d]``;
           3. every micro-batch again with its RNG states replayed (same dropout masks, same
              MoE routing), backpropagating the surrogate ``sum(emb_i * grad_i)``, whose
              parameter gradient is the loss's.
         Micro-batches are lists of texts (``batching.group_chunks``, or
         ``batching.token_chunks`` under a token budget), since only embeddings meet the loss.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megaemb import platform
from megaemb.data.batching import (GroupBatch, TextBatch, chunk_cost, group_chunks, group_texts,
                                   step_micro_batches, text_batch, text_keys, token_chunks)
from megaemb.data.sampler import micro_batches
from megaemb.loss import GroupLoss
from megaemb.parallel import rng_states, set_rng_states


@dataclass(frozen=True)
class Layout:
    """How texts become ``TextBatch``es: pad id, packed or padded, sequence multiple (SP);
    on CUDA in pinned host memory (``platform.pinned``), copied to the GPU asynchronously."""

    pad_id: int
    packed: bool
    multiple: int = 1

    def batch(self, seqs: list) -> TextBatch:
        return platform.pinned(text_batch(seqs, self.pad_id, packed=self.packed, multiple=self.multiple))

    def micro_batches(self, rows: list, micro_batch_size: int) -> list[GroupBatch]:
        """The plain step's micro-batches of ``micro_batch_size`` groups each."""
        return [replace(b, texts=platform.pinned(b.texts)) for b in step_micro_batches(
            rows, micro_batch_size, self.pad_id, packed=self.packed, multiple=self.multiple)]


@dataclass
class StepOutput:
    """loss: this rank's loss, fp32 scalar (last pipeline stage; zero elsewhere);
    batches: the micro-batches computed (token, padding and FLOPs counts);
    replay_error: cached step, max |embedding of pass 3 - of pass 1| (0.0 when the replay is
    exact; None on other pipeline stages and for the plain step)."""

    loss: torch.Tensor
    batches: list[TextBatch]
    replay_error: float | None = None


def _schedule(model, forward_step, batches: list[TextBatch], forward_only: bool):
    """Run ``forward_step(data_iterator, model)`` over ``batches``; the iterator yields
    micro-batch indices. Returns megatron's list of the loss functions' dicts."""
    first = batches[0].input_ids
    return get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(range(len(batches))), model=[model],
        num_microbatches=len(batches), seq_length=first.shape[1], micro_batch_size=first.shape[0],
        forward_only=forward_only)


def _embed(model, batch: TextBatch) -> torch.Tensor:
    """Embeddings ``[n, h]`` (normalised, fp32) on the last stage, else hidden ``[s, b, h]``."""
    return model(batch.to(platform.device()), normalize=True)


def plain_step(model, micro: list, loss: Callable) -> StepOutput:
    """Forward and backward of each micro-batch with its own loss (see the module docstring).
    ``micro``: batches with ``texts`` (``GroupBatch``es, or a task's); ``loss(outputs, batch,
    data-parallel group)``, e.g. ``GroupLoss.of_batch``."""
    group = parallel_state.get_data_parallel_group()

    def forward_step(data_iterator, model):
        batch = micro[next(data_iterator)]

        def loss_func(emb):
            value = loss(emb, batch, group)
            return value, {"loss": value.detach().clone()}
        return _embed(model, batch.texts), loss_func

    out = _schedule(model, forward_step, [b.texts for b in micro], forward_only=False)
    value = torch.stack([d["loss"] for d in out]).mean() if out else torch.zeros(())
    return StepOutput(value.float(), [b.texts for b in micro])


def plain_micro_batch_size(texts: list[list], layout: Layout, max_tokens: int) -> int:
    """Rows per micro-batch of the plain step under a token budget. ``texts``: this rank's
    rows, each as the token sequences it puts into its micro-batch (an embedding group's
    query, positive and negatives; a reranker row's prompts, all its drawn candidates), so a
    row is never split. The largest divisor of ``len(texts)`` that keeps every micro-batch of
    every data-parallel rank within ``max_tokens`` (``chunk_cost``), so all ranks pass the
    loss equally many rows (in-batch candidates are gathered over them) and run equally many
    micro-batches (an expert-parallel all-to-all runs in each); 1 when even single rows
    exceed the budget. A collective over the data-parallel group; chosen anew each step,
    from that step's lengths."""
    n = len(texts)
    sizes = [d for d in range(1, n + 1) if n % d == 0]
    fits = torch.tensor([_fits(texts, d, layout, max_tokens) for d in sizes], dtype=torch.int32,
                        device=platform.device())
    dist.all_reduce(fits, op=dist.ReduceOp.MIN, group=parallel_state.get_data_parallel_group())
    return max(d for d, ok in zip(sizes, fits.tolist()) if ok or d == 1)


def _fits(texts: list[list], size: int, layout: Layout, max_tokens: int) -> bool:
    """Whether every micro-batch of ``size`` consecutive rows computes <= ``max_tokens``."""
    return all(chunk_cost([len(s) for row in mb for s in row], packed=layout.packed,
                          multiple=layout.multiple) <= max_tokens
               for mb in micro_batches(texts, size))


def cached_chunks(rows: list, layout: Layout, *, micro_batch_size: int,
                  max_tokens: int = 0) -> list[list[int]]:
    """This rank's micro-batches (text indices into ``group_texts(rows)``): consecutive
    ``micro_batch_size`` groups, or with ``max_tokens`` a token budget. Under a budget every
    data-parallel rank cuts as many micro-batches as the rank that needs most (an
    expert-parallel all-to-all runs in every micro-batch's forward on each rank)."""
    seqs, m, k, _ = group_texts(rows)
    if not max_tokens:
        return group_chunks(m, k, micro_batch_size)
    lengths = [len(s) for s in seqs]
    cut = dict(packed=layout.packed, multiple=layout.multiple)
    count = torch.tensor([len(token_chunks(lengths, max_tokens, **cut))], device=platform.device())
    dist.all_reduce(count, op=dist.ReduceOp.MAX, group=parallel_state.get_data_parallel_group())
    return token_chunks(lengths, max_tokens, count=int(count), **cut)


def cached_step(model, rows: list, chunks: list[list[int]], loss: GroupLoss,
                layout: Layout) -> StepOutput:
    """The loss of all ``rows`` (this rank's groups of the global batch), with gradient caching
    over the micro-batches ``chunks`` (text indices into ``group_texts(rows)``; see
    ``cached_chunks``). Three passes, as the module docstring says."""
    seqs, m, k, labels = group_texts(rows)
    batches = [layout.batch([seqs[i] for i in c]) for c in chunks]
    last = parallel_state.is_pipeline_last_stage()
    num = len(batches)

    # 1. forward only: embeddings and the RNG states each micro-batch starts from
    starts, cached = [], [None] * num

    def forward_only(data_iterator, model):
        i = next(data_iterator)
        starts.append(rng_states())

        def keep(emb):
            cached[i] = emb.detach()
            return emb.sum() * 0, {}
        return _embed(model, batches[i]), keep

    with torch.no_grad():
        _schedule(model, forward_only, batches, forward_only=True)
    after = rng_states()

    # 2. the loss of every group, differentiated to the embeddings only
    value, grad = torch.zeros(()), None
    if last:
        emb = torch.empty(len(seqs), cached[0].shape[-1], device=cached[0].device)
        for c, e in zip(chunks, cached):
            emb[torch.tensor(c, device=emb.device)] = e
        emb.requires_grad_(True)
        value = loss(emb, m, k, labels, parallel_state.get_data_parallel_group(), text_keys(seqs))
        value.backward()
        grad = emb.grad

    # 3. replay each micro-batch and backpropagate its slice of the cached gradient; the
    # schedule divides a micro-batch's loss by the number of micro-batches, hence `* num`
    errors = []

    def replay(data_iterator, model):
        i = next(data_iterator)
        set_rng_states(starts[i])

        def surrogate(emb):
            errors.append((emb.detach() - cached[i]).abs().max())
            index = torch.tensor(chunks[i], device=emb.device)
            return (emb * grad[index]).sum() * num, {}
        return _embed(model, batches[i]), surrogate

    _schedule(model, replay, batches, forward_only=False)
    set_rng_states(after)
    replay_error = float(torch.stack(errors).max()) if errors else None
    return StepOutput(value.detach().float(), batches, replay_error)
