"""Query-document pairs -> token ids exactly as Qwen3-Reranker's model card builds them.

The official snippet (huggingface.co/Qwen/Qwen3-Reranker-0.6B, "Transformers usage") tokenises
three strings without added special tokens and concatenates the ids:

    prefix  "<|im_start|>system\\n{SYSTEM}<|im_end|>\\n<|im_start|>user\\n"
    body    "<Instruct>: {instruction}\\n<Query>: {query}\\n<Document>: {document}"
    suffix  "<|im_end|>\\n<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n"

and scores the last position: P(yes) = sigmoid(l_yes - l_no). ms-swift's ``qwen3_reranker``
template builds the same text (swift/template/templates/qwen.py).

Truncation: the snippet cuts the body from its end to ``max_length - len(prefix) -
len(suffix)`` tokens, which eats into the query when the document is short. megaemb cuts only
the document and never the suffix: the body is tokenised as a head ``"...<Document>:"`` and a
tail ``" " + document``. A ``:`` followed by whitespace always ends a pre-token of Qwen's
byte-level BPE (its pre-tokeniser puts punctuation runs and whitespace in different pieces),
so head + tail ids are the body's ids, and an uncut pair is token for token the snippet's. A
query (with the template and instruction) that leaves no room for one document token is a
``file:line`` ``DataError``.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping

from megaemb.data.formats import DataError

SYSTEM = ('Judge whether the Document meets the requirements based on the Query and the Instruct '
          'provided. Note that the answer can only be "yes" or "no".')
PREFIX = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n"
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
QUERY_TOO_LONG = "query too long"  # a RowReport reason, like those of data/formats.py

# ms-swift's environment variables for the scored tokens, and their defaults
SCORE_TOKEN_ENV = (("GENERATIVE_RERANKER_POSITIVE_TOKEN", "yes"),
                   ("GENERATIVE_RERANKER_NEGATIVE_TOKEN", "no"))


def head_text(query: str, instruction: str | None) -> str:
    """The body up to and including ``<Document>:`` (its space belongs to the document)."""
    return f"<Instruct>: {instruction or DEFAULT_INSTRUCTION}\n<Query>: {query}\n<Document>:"


def prompt_text(query: str, document: str, instruction: str | None = None) -> str:
    """The whole prompt as one string, as the model card formats it."""
    return PREFIX + head_text(query, instruction) + " " + document + SUFFIX


def chat_template() -> str:
    """A Jinja chat template that renders a ``query`` / ``document`` message pair (and an
    optional ``system`` message: the instruction, else the default) to ``prompt_text``: what
    sentence-transformers' ``CrossEncoder`` renders a ``(query, document)`` pair with (and
    ``predict(..., prompt=INSTRUCTION)`` as a system message). Literals are JSON strings,
    valid Jinja string literals, so the template's text is exactly these constants."""
    def role(name: str) -> str:
        return f'messages | selectattr("role", "eq", "{name}") | map(attribute="content") | first'
    return (f"{{%- set query = {role('query')} -%}}\n"
            f"{{%- set document = {role('document')} -%}}\n"
            f"{{%- set instruction = {role('system')} | default({json.dumps(DEFAULT_INSTRUCTION)}, true) -%}}\n"
            f"{{{{- {json.dumps(PREFIX + '<Instruct>: ')} + instruction + {json.dumps(chr(10) + '<Query>: ')}"
            f" + query + {json.dumps(chr(10) + '<Document>: ')} + document + {json.dumps(SUFFIX)} -}}}}")


def score_token_ids(tokenizer, env: Mapping[str, str] = os.environ) -> tuple[int, int]:
    """``(positive, negative)`` token ids: ``GENERATIVE_RERANKER_POSITIVE_TOKEN`` ("yes") and
    ``GENERATIVE_RERANKER_NEGATIVE_TOKEN`` ("no"), each a token of the vocabulary, looked up
    as ms-swift does (``convert_tokens_to_ids``: "yes" is 9693 and "no" 2152 in Qwen3's, a
    leading space is spelt "Ġ"). An unknown token or two equal ids raise ValueError."""
    ids = []
    for var, default in SCORE_TOKEN_ENV:
        token = env.get(var, default)
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise ValueError(f"{var}={token!r} is not a token of the tokenizer's vocabulary "
                             "(a leading space is spelt 'Ġ', e.g. 'Ġyes')")
        ids.append(token_id)
    if ids[0] == ids[1]:
        raise ValueError(f"GENERATIVE_RERANKER_POSITIVE_TOKEN and _NEGATIVE_TOKEN are the same "
                         f"token (id {ids[0]})")
    return ids[0], ids[1]


class RerankPromptTokenizer:
    """Token ids of Qwen3-Reranker prompts of at most ``max_length`` tokens.

    ``instruction`` (``--instruction``) replaces the default instruction; a row's own
    instruction (a system message, as ms-swift) replaces both. ``truncated`` counts the
    documents cut so far.
    """

    def __init__(self, tokenizer, max_length: int, instruction: str | None = None):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.instruction = instruction
        self.prefix_ids = self._ids(PREFIX)
        self.suffix_ids = self._ids(SUFFIX)
        self.truncated = 0
        fixed = len(self.prefix_ids) + len(self._head_ids("", None)) + len(self.suffix_ids)
        if fixed >= max_length:
            raise ValueError(f"--max_length {max_length} is too small for the reranker prompt: "
                             f"its template and instruction alone take {fixed} tokens")

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _head_ids(self, query: str, instruction: str | None) -> list[int]:
        return self._ids(head_text(query, instruction or self.instruction))

    def encode_group(self, query: str, documents: list[str], *, source: str,
                     query_field: str = "query", instruction: str | None = None
                     ) -> list[list[int]]:
        """One prompt's ids per document, sharing the query's tokenisation. A document that
        does not fit is cut at its end; a query that leaves no room for one document token
        raises ``DataError`` naming ``source`` (file:line) and ``query_field``."""
        head = self.prefix_ids + self._head_ids(query, instruction)
        room = self.max_length - len(head) - len(self.suffix_ids)
        if room < 1:
            raise DataError(
                f"{source}: field '{query_field}': the query with the reranker template takes "
                f"{len(head) + len(self.suffix_ids)} tokens, leaving no room for the document "
                f"within --max_length {self.max_length}", QUERY_TOO_LONG)
        tails = self.tokenizer([" " + d for d in documents], add_special_tokens=False)["input_ids"]
        self.truncated += sum(len(tail) > room for tail in tails)
        return [head + tail[:room] + self.suffix_ids for tail in tails]
