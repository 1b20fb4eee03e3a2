"""Evaluation sets for ``megaemb eval`` / ``megaemb mine``: retrieval (a local BEIR folder, or
the infonce JSONL format) and labelled pairs (STS).

    BEIR folder    corpus.jsonl ({"_id", "title"?, "text"}), queries.jsonl ({"_id", "text"}),
                   qrels/<split>.tsv (header, then query-id, corpus-id, score; score > 0 is
                   relevant); ``split`` = test, else dev, else the only .tsv
    infonce files  query / response / rejected_response (``data.formats``): the corpus is every
                   distinct response and rejected response; a query's relevant documents are
                   its responses (a query may appear on several rows)
    pair files     query / response / label with float labels (any finite scale, e.g. STS-B's 0-5)

Malformed input stops with ``file:line: ...`` (``DataError``).
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass

from megaemb.data.formats import BadRow, DataError, file_rows, is_labelled, json_lines, load_examples


@dataclass
class RetrievalSet:
    """``relevant[i]``: corpus ids relevant to ``queries[i]`` (non-empty)."""

    queries: list[str]
    corpus: list[str]
    relevant: list[set[int]]


@dataclass
class PairSet:
    texts1: list[str]
    texts2: list[str]
    labels: list[float]


def is_beir(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "corpus.jsonl"))


def _jsonl(path: str, fields: tuple[str, ...]) -> list[dict]:
    """Objects of a BEIR JSONL file, each with non-empty string ``fields`` and a unique
    ``_id``; ``DataError`` at ``file:line`` otherwise (line parsing as ``data.formats`` does
    it; a duplicate ``_id`` names both lines)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: missing (a BEIR folder has corpus.jsonl, queries.jsonl, qrels/)")
    rows, lines = [], {}
    for lineno, row in json_lines(path):
        if isinstance(row, BadRow):
            raise DataError(f"{path}:{lineno}: {row}")
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: expected an object")
        for name in fields:
            if not isinstance(row.get(name), str) or (name == "text" and not row[name].strip()):
                raise DataError(f"{path}:{lineno}: field {name!r} missing, empty or not a string")
        first = lines.setdefault(row["_id"], lineno)
        if first != lineno:
            raise DataError(f"{path}:{lineno}: duplicate _id {row['_id']!r} (also on line {first})")
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def _qrels_file(folder: str) -> str:
    qrels = os.path.join(folder, "qrels")
    names = sorted(n for n in os.listdir(qrels) if n.endswith(".tsv")) if os.path.isdir(qrels) else []
    for split in ("test.tsv", "dev.tsv"):
        if split in names:
            return os.path.join(qrels, split)
    if len(names) == 1:
        return os.path.join(qrels, names[0])
    raise DataError(f"{qrels}: expected test.tsv, dev.tsv or a single .tsv, found {names or 'none'}")


def _qrels(path: str, query_ids, doc_index: dict[str, int]) -> dict[str, set[int]]:
    """qrels TSV -> query-id -> corpus ids with score > 0. An unknown id, a score that is not
    a number, or a pair listed twice with different scores stops with ``file:line``."""
    relevant: dict[str, set[int]] = {}
    scores: dict[tuple[str, str], tuple[float, int]] = {}  # (query-id, corpus-id) -> (score, line)
    with open(path, encoding="utf-8", newline="") as f:
        for lineno, row in enumerate(csv.reader(f, delimiter="\t"), 1):
            if lineno == 1 and row and not row[-1].strip().lstrip("-").isdigit():
                continue  # the header
            if len(row) < 3:
                raise DataError(f"{path}:{lineno}: expected query-id, corpus-id, score")
            qid, did, text = row[0], row[-2], row[-1]
            if qid not in query_ids:
                raise DataError(f"{path}:{lineno}: query-id {qid!r} not in queries.jsonl")
            if did not in doc_index:
                raise DataError(f"{path}:{lineno}: corpus-id {did!r} not in corpus.jsonl")
            try:
                score = float(text)
            except ValueError:
                raise DataError(f"{path}:{lineno}: score {text!r} is not a number") from None
            seen, line = scores.setdefault((qid, did), (score, lineno))
            if seen != score:
                raise DataError(f"{path}:{lineno}: query-id {qid!r}, corpus-id {did!r} has score "
                                f"{text} here and {seen:g} on line {line}")
            if score > 0:
                relevant.setdefault(qid, set()).add(doc_index[did])
    return relevant


def read_beir(folder: str) -> RetrievalSet:
    corpus_rows = _jsonl(os.path.join(folder, "corpus.jsonl"), ("_id", "text"))
    query_rows = _jsonl(os.path.join(folder, "queries.jsonl"), ("_id", "text"))
    doc_index = {r["_id"]: i for i, r in enumerate(corpus_rows)}
    query_text = {r["_id"]: r["text"] for r in query_rows}
    path = _qrels_file(folder)
    relevant = _qrels(path, query_text, doc_index)
    if not relevant:
        raise DataError(f"{path}: no relevant (score > 0) pairs")
    qids = [r["_id"] for r in query_rows if r["_id"] in relevant]
    corpus = [(r.get("title", "") + " " + r["text"]).strip() if r.get("title") else r["text"]
              for r in corpus_rows]
    return RetrievalSet([query_text[q] for q in qids], corpus, [relevant[q] for q in qids])


def infonce_corpus(examples: list) -> tuple[dict[str, int], dict[str, set[int]]]:
    """infonce examples -> (every distinct response and rejected response -> its corpus id,
    each query -> the ids of all its responses)."""
    corpus: dict[str, int] = {}
    for e in examples:
        for text in (e.response, *e.negatives):
            corpus.setdefault(text, len(corpus))
    relevant: dict[str, set[int]] = {}
    for e in examples:
        relevant.setdefault(e.query, set()).add(corpus[e.response])
    return corpus, relevant


def read_infonce(specs: list[str]) -> RetrievalSet:
    corpus, relevant = infonce_corpus(load_examples(specs, "infonce")[0])
    return RetrievalSet(list(relevant), list(corpus), list(relevant.values()))


def rows_as_set(examples: list, loss_type: str) -> RetrievalSet | PairSet:
    """Training rows as ``sft``'s in-loop eval scores them: infonce rows -> each row a query
    whose one relevant document is its response, in the corpus of the rows' distinct
    responses (sorted); labelled rows -> pairs."""
    if loss_type != "infonce":
        return PairSet([e.query for e in examples], [e.response for e in examples],
                       [float(e.label) for e in examples])
    corpus = sorted({e.response for e in examples})
    where = {t: i for i, t in enumerate(corpus)}
    return RetrievalSet([e.query for e in examples], corpus, [{where[e.response]} for e in examples])


def first_queries(data: RetrievalSet, limit: int) -> RetrievalSet:
    """The first ``limit`` (0: all) queries of a retrieval set, with the whole corpus."""
    if not limit:
        return data
    return RetrievalSet(data.queries[:limit], data.corpus, data.relevant[:limit])


def read_pairs(specs: list[str]) -> PairSet:
    """Labelled pairs; ``DataError`` when every label is the same (Spearman and Pearson of a
    constant are undefined: there is nothing to correlate with)."""
    examples, _ = load_examples(specs, "sts")
    labels = [float(e.label) for e in examples]
    if len(set(labels)) == 1:
        raise DataError(f"{' '.join(specs)}: every label is {labels[0]:g}; Spearman and Pearson "
                        "score how cosines follow labels that vary (e.g. STS-B's 0-5)")
    return PairSet([e.query for e in examples], [e.response for e in examples], labels)


def has_float_labels(path: str) -> bool:
    """Whether the first row of a dataset file or folder (any format ``data.formats`` reads)
    has a ``label`` (pairs) rather than none (infonce rows); the other rows must match it
    (``data.formats`` refuses a mixed file at its first odd row)."""
    for _, row in file_rows(path):
        return is_labelled(row)
    return False
