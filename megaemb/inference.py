"""Forward-only embedding through megatron's schedules (so every TP/PP/EP layout works).

Input: right-padded ``input_ids [n, s]`` and ``lengths [n]`` on every rank of one model replica
(all TP/PP ranks see the same rows). Output: embeddings ``[n, dim]`` (fp32) on every rank of
the replica: the last pipeline stage computes them and broadcasts over the pipeline group.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func


@torch.no_grad()
def forward_embeddings(model, input_ids: torch.Tensor, lengths: torch.Tensor, *,
                       micro_batch_size: int = 8, dim: int | None = None) -> torch.Tensor:
    model.eval()
    device = next(model.parameters()).device
    chunks = list(zip(input_ids.to(device).split(micro_batch_size), lengths.to(device).split(micro_batch_size)))
    # every micro-batch gets the same padded length: pipeline stages exchange [s, b, h]
    seq_len = input_ids.shape[1]

    def forward_step(data_iterator, m):
        ids, lens = next(data_iterator)
        if ids.shape[0] < micro_batch_size:  # last chunk: pad rows so p2p shapes agree
            pad = micro_batch_size - ids.shape[0]
            ids = torch.cat([ids, ids.new_zeros(pad, seq_len)])
            lens = torch.cat([lens, lens.new_ones(pad)])
        out = m(ids, lens, dim=dim)
        return out, lambda output, non_loss_data=True: output

    outputs = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(chunks), model=[model],
        num_microbatches=len(chunks), seq_length=seq_len, micro_batch_size=micro_batch_size,
        forward_only=True, collect_non_loss_data=True)
    width = dim or model.shape.hidden_size
    n = input_ids.shape[0]
    if parallel_state.is_pipeline_last_stage():
        result = torch.cat(outputs)[:n].float().contiguous()
    else:
        result = torch.empty(n, width, device=device)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(result, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
    return result
