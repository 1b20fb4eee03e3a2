"""``--test_convert_precision``: the converted model vs transformers on sample texts."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megaemb.data.batching import pad_batch
from megaemb.data.tokenize import EmbeddingTokenizer
from megaemb.inference import forward_embeddings

SAMPLE_TEXTS = [
    "jq - lightweight and flexible command-line JSON processor",
    "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:"
    "how do I parse JSON in a shell script?",
    "Megatron-Core splits each layer across GPUs.",
    "a",
]


@torch.no_grad()
def compare_with_transformers(model, hf_weights_dir: str, tokenizer_dir: str) -> dict | None:
    """Collective. Rank 0 also runs ``AutoModel`` from ``hf_weights_dir`` (fp32) and returns
    ``{"max_abs_diff", "min_cosine"}``; other ranks return None."""
    tok = EmbeddingTokenizer(tokenizer_dir, max_length=128)
    seqs = tok.encode(SAMPLE_TEXTS)
    ours = forward_embeddings(model, seqs, pad_id=tok.pad_id).cpu()
    batch = pad_batch(seqs, tok.pad_id)
    ids, lengths = batch.input_ids, batch.lengths
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    from transformers import AutoModel

    hf = AutoModel.from_pretrained(hf_weights_dir, dtype=torch.float32).eval()
    mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()
    hidden = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    ref = F.normalize(hidden[torch.arange(len(ids)), lengths - 1].float(), dim=-1)
    return {"max_abs_diff": (ours - ref).abs().max().item(),
            "min_cosine": F.cosine_similarity(ours, ref, dim=-1).min().item()}
