"""Forward-only embedding through megatron's schedules (so every TP/PP/EP layout works).

Input: ``n`` token-id lists (each ending with its end token) on every rank of one model
replica (all TP/PP ranks see the same texts). They are cut into micro-batches of
``micro_batch_size`` texts, each padded ``[m, s]`` or packed ``[1, T]`` on its own (pipeline
stages exchange shapes). Output: embeddings ``[n, dim]`` (fp32) on every rank of the replica:
the last pipeline stage computes them and broadcasts over the pipeline group.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megaemb.data.batching import text_batch


@torch.no_grad()
def forward_embeddings(model, seqs: list, *, pad_id: int, packed: bool = False,
                       micro_batch_size: int = 8, dim: int | None = None) -> torch.Tensor:
    """``seqs``: ``n`` token-id lists -> ``[n, dim or h]`` fp32, in input order (a model with a
    scoring head: its scores ``[n]``)."""
    model.eval()
    device = next(model.parameters()).device
    batches = [text_batch(seqs[i:i + micro_batch_size], pad_id, packed=packed,
                          multiple=model.sequence_multiple).to(device)
               for i in range(0, len(seqs), micro_batch_size)]

    def forward_step(data_iterator, m):
        out = m(next(data_iterator), dim=dim)
        return out, lambda output, non_loss_data=True: output

    outputs = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(batches), model=[model],
        num_microbatches=len(batches), seq_length=batches[0].input_ids.shape[1],
        micro_batch_size=batches[0].input_ids.shape[0], forward_only=True, collect_non_loss_data=True)
    if parallel_state.is_pipeline_last_stage():
        result = torch.cat(outputs).float().contiguous()
    else:
        result = torch.empty(model.output_shape(len(seqs), dim), device=device)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(result, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
    return result
