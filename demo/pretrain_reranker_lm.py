"""Causal-LM pretraining of the demo's tiny reranker on the train slice's own texts: the
analogue of Qwen3-Reranker starting from Qwen3 base rather than from random weights.

    python demo/pretrain_reranker_lm.py MODEL_DIR OUT_DIR [--data demo/data/train.jsonl] [--steps N]

Texts: each row's pair as ``"<Query>: {query}\\n<Document>: {response}"`` plus every other
document among its ``rejected_response`` as ``"<Document>: {document}"`` (the demo slice: 2,000
pairs + 5,047 descriptions), at most ``max_length`` tokens each.

A random model with the full 151,669-token vocabulary spends most of a CPU step on the
embedding and the LM head, so the loop trains a copy restricted to the ``K`` tokens the texts
use at least ``min_count`` times plus the reranker template, ``yes``/``no`` and the pad token;
rarer tokens share one extra slot (index ``K``). After training, the ``K`` rows are scattered
back into the full model's embedding ``[V, H]`` and LM head ``[V, H]``; the rows of the other
``V - K`` tokens keep their initial values. Plain transformers (``Qwen3ForCausalLM``), one
process; AdamW, linear warm-up then cosine decay, gradient clipping at 1.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from collections import Counter

import torch


def lm_texts(path: str) -> list[str]:
    """The pretraining texts of a megaemb training file (any infonce format; a bad row is a
    ``file:line`` ``DataError``): one per row's pair, then one per distinct other document."""
    from megaemb.data.formats import load_examples

    rows, _ = load_examples([path], "infonce")
    texts = [f"<Query>: {r.query}\n<Document>: {r.response}" for r in rows]
    seen = {r.response for r in rows}
    for r in rows:
        for d in r.negatives:
            if d not in seen:
                seen.add(d)
                texts.append(f"<Document>: {d}")
    return texts


def kept_tokens(token_ids: list[list[int]], always: set[int], min_count: int) -> torch.Tensor:
    """Sorted ids ``[K]`` of the tokens used at least ``min_count`` times, and ``always``."""
    counts = Counter(t for ids in token_ids for t in ids)
    return torch.tensor(sorted({t for t, c in counts.items() if c >= min_count} | always))


def restrict(model, kept: torch.Tensor):
    """A copy of ``model`` (untied ``*ForCausalLM``) whose vocabulary is ``kept`` ``[K]`` plus
    one shared slot for every other token (its rows: the mean of the full rows); special token
    ids are renumbered (``kept`` must hold them)."""
    special = {k: int(torch.searchsorted(kept, v)) for k in ("pad_token_id", "eos_token_id", "bos_token_id")
               if (v := getattr(model.config, k, None)) is not None and v in kept}
    config = model.config.__class__.from_dict({**model.config.to_dict(), "vocab_size": len(kept) + 1,
                                               **special})
    small = model.__class__(config)
    state = dict(model.state_dict())
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        full = state[name]
        state[name] = torch.cat([full[kept], full.mean(0, keepdim=True)])
    small.load_state_dict(state)
    return small


@torch.no_grad()
def scatter_back(model, small, kept: torch.Tensor) -> None:
    """Write ``small``'s non-embedding weights and its ``K`` vocabulary rows into ``model``
    (in place); the full model's other rows are left as they were."""
    state = small.state_dict()
    for name, p in model.state_dict().items():
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            p[kept] = state[name][:len(kept)]
        else:
            p.copy_(state[name])


def always_kept(tokenizer) -> set[int]:
    """Token ids the reranker needs whatever the texts: its template, yes/no, pad and eos."""
    from megaemb.tasks.reranker_prompt import prompt_text, score_token_ids

    ids = set(tokenizer(prompt_text("", ""), add_special_tokens=False)["input_ids"])
    return ids | set(score_token_ids(tokenizer)) | {tokenizer.pad_token_id, tokenizer.eos_token_id}


def pretrain(model_dir: str, out_dir: str, data: str, *, steps: int = 1200, batch_size: int = 32,
             lr: float = 3e-3, warmup: int = 100, max_length: int = 128, min_count: int = 5,
             seed: int = 0) -> dict:
    """Train ``model_dir`` (an untied ``Qwen3ForCausalLM`` with its tokenizer) as a causal LM on
    ``lm_texts(data)`` and save it to ``out_dir``: returns the text and kept-token counts and
    the first loss and the mean of the last 20."""
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if model.config.tie_word_embeddings:
        raise SystemExit(f"{model_dir}: tied embeddings; pretrain_reranker_lm.py needs an untied model")
    texts = lm_texts(data)
    token_ids = [ids + [tokenizer.eos_token_id] for ids in
                 tokenizer(texts, add_special_tokens=False, truncation=True,
                           max_length=max_length - 1)["input_ids"]]
    kept = kept_tokens(token_ids, always_kept(tokenizer), min_count)
    to_small = torch.full((model.config.vocab_size,), len(kept), dtype=torch.long)
    to_small[kept] = torch.arange(len(kept))
    small = restrict(model, kept).train()
    opt = torch.optim.AdamW(small.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, max(0, s - warmup) / max(1, steps - warmup)))))
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    losses = []
    bar = tqdm(range(steps), desc=f"LM pretraining ({len(texts)} texts, {len(kept)} tokens kept)")
    for step in bar:
        if len(order) < batch_size:
            order += torch.randperm(len(texts), generator=gen).tolist()
        picked, order = order[:batch_size], order[batch_size:]
        width = max(len(token_ids[i]) for i in picked)
        ids = torch.zeros(len(picked), width, dtype=torch.long)
        mask = torch.zeros(len(picked), width, dtype=torch.long)
        for row, i in enumerate(picked):
            ids[row, :len(token_ids[i])] = to_small[torch.tensor(token_ids[i])]
            mask[row, :len(token_ids[i])] = 1
        loss = small(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(small.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    scatter_back(model, small, kept)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    first, last = losses[0], sum(losses[-20:]) / len(losses[-20:])
    print(f"LM pretraining: {steps} steps of {batch_size} texts, loss {first:.2f} -> {last:.2f} "
          f"(mean of the last {min(20, len(losses))}); saved {out_dir}", flush=True)
    return {"texts": len(texts), "kept_tokens": len(kept), "first_loss": first, "last_loss": last}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir")
    p.add_argument("out_dir")
    p.add_argument("--data", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "data", "train.jsonl"))
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for flag in ("steps", "batch_size"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if not math.isfinite(args.lr) or args.lr <= 0:
        p.error(f"--lr must be a positive number, got {args.lr}")
    config = os.path.join(args.model_dir, "config.json")
    if not os.path.isfile(config):
        p.error(f"{args.model_dir}: not a transformers model directory (no config.json)")
    with open(config) as f:
        architectures = json.load(f).get("architectures") or []
    if not any(a.endswith("ForCausalLM") for a in architectures):
        p.error(f"{args.model_dir}: a {', '.join(architectures) or 'model'}, not a *ForCausalLM "
                "(python -m megaemb.tiny DIR --reranker makes one)")
    if not os.path.isfile(args.data):
        p.error(f"--data {args.data}: no such file")
    if os.path.isfile(args.out_dir) or os.path.isdir(args.out_dir) and os.listdir(args.out_dir):
        p.error(f"{args.out_dir} exists and is not an empty directory")
    from megaemb.data.formats import DataError

    try:
        pretrain(args.model_dir, args.out_dir, args.data, steps=args.steps, batch_size=args.batch_size,
                 lr=args.lr, seed=args.seed)
    except DataError as e:
        p.error(str(e))


if __name__ == "__main__":
    main()
