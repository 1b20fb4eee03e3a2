"""Text -> token ids the way Qwen3-Embedding expects: optional query instruction, then
``<|endoftext|>`` appended; truncation keeps the end token (it is the one pooled)."""
from __future__ import annotations

from dataclasses import dataclass

END_TOKEN = "<|endoftext|>"


def format_query(text: str, instruction: str | None) -> str:
    """Qwen3-Embedding's query format; documents are embedded without instruction."""
    return f"Instruct: {instruction}\nQuery:{text}" if instruction else text


class EmbeddingTokenizer:
    def __init__(self, tokenizer_dir: str, max_length: int = 512):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        self.end_id = self.tokenizer.convert_tokens_to_ids(END_TOKEN)
        if self.end_id is None or self.end_id == self.tokenizer.unk_token_id:
            raise ValueError(f"{tokenizer_dir}: tokenizer has no {END_TOKEN} token")
        self.pad_id = self.end_id
        if max_length < 2:
            raise ValueError(f"--max_length must be >= 2, got {max_length}")
        self.max_length = max_length
        self.truncated = 0  # rows cut to max_length so far

    def encode(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        ids = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        out = []
        for row in ids:
            if len(row) + 1 > self.max_length:
                self.truncated += 1
                row = row[: self.max_length - 1]
            out.append(row + [self.end_id])
        return out


@dataclass
class TokenizedExample:
    """One example's ids: lists from ``tokenize_examples``, int32 arrays from a ``TokenStore``."""

    query: list[int]
    doc: list[int]
    negatives: list[list[int]]
    label: float | None


def tokenize_examples(examples: list, negatives: list[list[str]], tok: EmbeddingTokenizer,
                      instruction: str) -> list[TokenizedExample]:
    queries = tok.encode([format_query(e.query, instruction or None) for e in examples])
    docs = tok.encode([e.response for e in examples])
    flat = tok.encode([n for row in negatives for n in row])
    out, at = [], 0
    for e, q, d, row in zip(examples, queries, docs, negatives):
        out.append(TokenizedExample(q, d, flat[at:at + len(row)], e.label))
        at += len(row)
    return out
