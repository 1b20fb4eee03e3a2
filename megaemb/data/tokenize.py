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
        return self.encode_marked(texts)[0]

    def encode_marked(self, texts: list[str]) -> tuple[list[list[int]], list[bool]]:
        """``encode``, and for each text whether it was cut to ``max_length``."""
        if not texts:
            return [], []
        ids = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        out, cut = [], []
        for row in ids:
            cut.append(len(row) + 1 > self.max_length)
            if cut[-1]:
                self.truncated += 1
                row = row[: self.max_length - 1]
            out.append(row + [self.end_id])
        return out, cut


@dataclass
class TokenizedExample:
    """One example's ids: int32 arrays from a ``TokenStore`` (lists in tests)."""

    query: list[int]
    doc: list[int]
    negatives: list[list[int]]
    label: float | None
