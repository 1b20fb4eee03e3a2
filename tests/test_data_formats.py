"""megaemb.data.formats: every row format, file type, #N sampling and bad-row class."""
from __future__ import annotations

import json
import os
import re
from collections import Counter

import pytest

from megaemb.data.formats import DataError, Example, load_examples, sample_indices

# a bundled slice of the real debian-desc training set (shared/data/debian-desc)
REAL_TRAIN = os.path.join(os.path.dirname(__file__), "..", "demo", "data", "train.jsonl")
GOOD = {
    "infonce": {"query": "q", "response": "r"},
    "cosine_similarity": {"query": "q", "response": "r", "label": 0.5},
    "contrastive": {"query": "q", "response": "r", "label": 1},
    "online_contrastive": {"query": "q", "response": "r", "label": 0},
}


def write_jsonl(path, rows) -> str:
    """Rows are dicts (dumped as JSON) or raw strings (written as they are)."""
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def rows_of(n: int, **extra) -> list[dict]:
    return [{"query": f"q{i}", "response": f"r{i}", **extra} for i in range(n)]


def msgs(text: str, role: str = "user") -> list[dict]:
    return [{"role": role, "content": text}]


# ------------------------------------------------------------------ row formats

@pytest.mark.timeout(60)
def test_infonce_with_and_without_negatives(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [
        {"query": "q0", "response": "r0", "rejected_response": ["n0", "n1"]},
        {"query": "q1", "response": "r1"},
        {"query": "q2", "response": "r2", "rejected_response": []},
        {"query": "q3", "response": "r3", "rejected_response": None, "package": "x"},
    ])
    examples, report = load_examples([path], "infonce")
    assert examples[0] == Example("q0", "r0", ["n0", "n1"], None, f"{path}:1")
    assert [e.negatives for e in examples[1:]] == [[], [], []]
    assert report.summary() == "4 rows read, 0 skipped"


@pytest.mark.timeout(60)
def test_cosine_similarity_labels(tmp_path):
    labels = [-1, -0.25, 0, 1.0]
    path = write_jsonl(tmp_path / "a.jsonl",
                       [{**r, "label": lab} for r, lab in zip(rows_of(4), labels)])
    examples, _ = load_examples([path], "cosine_similarity")
    assert [e.label for e in examples] == [-1.0, -0.25, 0.0, 1.0]
    assert all(isinstance(e.label, float) and e.negatives == [] for e in examples)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("loss_type", ["contrastive", "online_contrastive"])
def test_binary_labels_accept_int_float_bool(tmp_path, loss_type):
    labels = [0, 1, 0.0, 1.0, False, True]
    path = write_jsonl(tmp_path / "a.jsonl",
                       [{**r, "label": lab} for r, lab in zip(rows_of(6), labels)])
    examples, _ = load_examples([path], loss_type)
    assert [e.label for e in examples] == [0.0, 1.0, 0.0, 1.0, 0.0, 1.0]


@pytest.mark.timeout(60)
def test_negatives_ignored_for_labelled_losses(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl",
                       [{"query": "q", "response": "r", "label": 1, "rejected_response": [5]}])
    examples, _ = load_examples([path], "contrastive")
    assert examples[0].negatives == []


@pytest.mark.timeout(60)
def test_messages_form(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [
        {"messages": [{"role": "system", "content": "be brief"}, *msgs("q0")],
         "positive_messages": [msgs("p0"), msgs("ignored")],
         "negative_messages": [msgs("n0"), msgs("n1")]},
        {"messages": msgs("q1", role="assistant"), "positive_messages": [msgs("p1")]},
        {"messages": [*msgs("early"), *msgs("q2"), {"role": "assistant", "content": "a"}],
         "positive_messages": [msgs("p2")], "negative_messages": []},
    ])
    examples, _ = load_examples([path], "infonce")
    assert [(e.query, e.response, e.negatives) for e in examples] == [
        ("q0", "p0", ["n0", "n1"]), ("q1", "p1", []), ("q2", "p2", [])]


@pytest.mark.timeout(60)
def test_messages_form_with_label(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [
        {"messages": msgs("q"), "positive_messages": [msgs("p")], "label": 0.75}])
    examples, _ = load_examples([path], "cosine_similarity")
    assert (examples[0].query, examples[0].response, examples[0].label) == ("q", "p", 0.75)


# ------------------------------------------------------------------- file types

@pytest.mark.timeout(60)
def test_json_array_reports_element_lines(tmp_path):
    rows = rows_of(3, rejected_response=["n"])
    path = tmp_path / "a.json"
    path.write_text(json.dumps(rows, indent=2))
    examples, _ = load_examples([str(path)], "infonce")
    assert [e.query for e in examples] == ["q0", "q1", "q2"]
    lines = path.read_text().splitlines()
    starts = [i + 1 for i, line in enumerate(lines) if line == "  {"]
    assert [e.source for e in examples] == [f"{path}:{n}" for n in starts]


@pytest.mark.timeout(60)
def test_json_array_bad_row_is_located(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[\n{"query": "q", "response": "r"},\n{"query": "q", "response": ""}\n]\n')
    with pytest.raises(DataError) as e:
        load_examples([str(path)], "infonce")
    assert str(e.value) == f"{path}:3: field 'response': empty string"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("text, line", [
    ('[\n{"query": "q", "response": "r"},\n{"query": \n]', 4),
    ('[\n{"query": "q", "response": "r"}\n{"query": "q", "response": "r"}]', 3),
    ('[\n{"query": "q", "response": "r"}', 2),
])
def test_broken_json_array_is_fatal_even_when_skipping(tmp_path, text, line):
    path = tmp_path / "a.json"
    path.write_text(text)
    with pytest.raises(DataError, match=rf"^{path}:{line}: invalid JSON array: "):
        load_examples([str(path)], "infonce", bad_rows="skip")


@pytest.mark.timeout(60)
def test_json_file_with_json_lines(tmp_path):
    path = write_jsonl(tmp_path / "a.json", rows_of(2))
    examples, _ = load_examples([path], "infonce")
    assert [e.source for e in examples] == [f"{path}:1", f"{path}:2"]


@pytest.mark.timeout(60)
def test_jsonl_blank_lines_and_bom(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"query": "q0", "response": "r0"}\n\n  \n'
                     + b'{"query": "q1", "response": "r1"}\n')
    examples, report = load_examples([str(path)], "infonce")
    assert [e.source for e in examples] == [f"{path}:1", f"{path}:4"]
    assert report.rows_read == 2


@pytest.mark.timeout(60)
def test_csv(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text('query,response,label\nq0,"r0, with comma",1\nq1,,0\nq2,r2,0\n')
    with pytest.raises(DataError) as e:
        load_examples([str(path)], "contrastive")
    assert str(e.value) == f"{path} row 2: field 'response': missing (null)"
    examples, report = load_examples([str(path)], "contrastive", bad_rows="skip")
    assert [(e.response, e.label, e.source) for e in examples] == [
        ("r0, with comma", 1.0, f"{path} row 1"), ("r2", 0.0, f"{path} row 3")]
    assert report.summary() == "3 rows read, 1 skipped (1 missing field)"


@pytest.mark.timeout(60)
def test_parquet(tmp_path):
    import datasets

    rows = rows_of(3, rejected_response=["n0", "n1"])
    rows[2]["rejected_response"] = ["n0", ""]
    path = str(tmp_path / "a.parquet")
    datasets.Dataset.from_list(rows).to_parquet(path)
    with pytest.raises(DataError) as e:
        load_examples([path], "infonce")
    assert str(e.value) == f"{path} row 3: field 'rejected_response[1]': empty string"
    examples, report = load_examples([path], "infonce", bad_rows="skip")
    assert [e.negatives for e in examples] == [["n0", "n1"], ["n0", "n1"]]
    assert report.skipped == Counter({"empty field": 1})
    rows = rows_of(9000)  # streamed in record batches of 4,096: row numbers run on across them
    rows[8000]["response"] = " "
    datasets.Dataset.from_list(rows).to_parquet(path)
    with pytest.raises(DataError, match=f"^{path} row 8001: field 'response': empty string"):
        load_examples([path], "infonce")
    examples, _ = load_examples([path], "infonce", bad_rows="skip")
    assert len(examples) == 8999 and examples[-1].source == f"{path} row 9000"


@pytest.mark.timeout(60)
def test_mixed_formats_stop_at_the_odd_row_in_columnar_files(tmp_path):
    """Parquet / folders hold every column in every row: a null label is an infonce row, a
    set one is a labelled pair, and one file cannot hold both."""
    import datasets

    rows = [{**r, "label": None} for r in rows_of(3)]
    path = str(tmp_path / "a.parquet")
    datasets.Dataset.from_list(rows).to_parquet(path)
    assert len(load_examples([path], "infonce")[0]) == 3
    rows[2]["label"] = 0.0
    datasets.Dataset.from_list(rows).to_parquet(path)
    with pytest.raises(DataError, match=f"^{path} row 3: field 'label': 0.0 in an infonce row"):
        load_examples([path], "infonce")
    with pytest.raises(DataError, match=f"^{path} row 1: field 'label': missing \\(null\\)"):
        load_examples([path], "contrastive")


@pytest.mark.timeout(60)
def test_datasets_folder(tmp_path):
    import datasets

    rows = [{**r, "label": 0.5} for r in rows_of(3)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    examples, _ = load_examples([str(tmp_path / "ds")], "cosine_similarity")
    assert [(e.query, e.label, e.source) for e in examples] == [
        (f"q{i}", 0.5, f"{tmp_path / 'ds'} row {i + 1}") for i in range(3)]


@pytest.mark.timeout(60)
def test_dataset_dict_folder_names_splits(tmp_path):
    import datasets

    split = datasets.Dataset.from_list(rows_of(2))
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"splits \['test', 'train'\]; pass one split's"):
        load_examples([str(tmp_path / "dd")], "infonce")
    examples, _ = load_examples([str(tmp_path / "dd" / "train")], "infonce")
    assert len(examples) == 2


@pytest.mark.timeout(60)
def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(DataError, match=rf"^{tmp_path}/nope.jsonl: file not found$"):
        load_examples([str(tmp_path / "nope.jsonl")], "infonce")
    (tmp_path / "a.txt").write_text("q\tr\n")
    with pytest.raises(DataError, match=r"a.txt: unsupported file type"):
        load_examples([str(tmp_path / "a.txt")], "infonce")
    (tmp_path / "plain_dir").mkdir()
    with pytest.raises(DataError, match=r"plain_dir: cannot read"):
        load_examples([str(tmp_path / "plain_dir")], "infonce")


@pytest.mark.timeout(60)
def test_zero_valid_rows(tmp_path):
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(DataError, match=rf"^{empty}: no valid rows$"):
        load_examples([empty], "infonce")
    bad = write_jsonl(tmp_path / "bad.jsonl", ["{", '{"query": "q"}'])
    with pytest.raises(DataError, match=rf"^{bad}: no valid rows$"):
        load_examples([bad], "infonce", bad_rows="skip")


@pytest.mark.timeout(60)
def test_bad_arguments(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", rows_of(1))
    with pytest.raises(ValueError, match="loss_type must be one of"):
        load_examples([path], "triplet")
    with pytest.raises(ValueError, match="bad_rows must be one of"):
        load_examples([path], "infonce", bad_rows="drop")
    with pytest.raises(DataError, match="no dataset given"):
        load_examples([], "infonce")


# -------------------------------------------------------------------- bad rows

BAD_ROWS = [
    # (loss_type, require_negatives, raw line, message after "file:2: ", reason)
    ("infonce", False, '{"query": ', "invalid JSON: Expecting value (column 11)", "invalid JSON"),
    ("infonce", False, '{"query": "q",}',
     "invalid JSON: Expecting property name enclosed in double quotes (column 15)",
     "invalid JSON"),
    ("infonce", False, '["q", "r"]', "expected a JSON object, got list", "not an object"),
    ("infonce", False, '"q"', "expected a JSON object, got string", "not an object"),
    ("infonce", False, '{"response": "r"}', "field 'query': missing", "missing field"),
    ("infonce", False, '{"query": "q"}', "field 'response': missing", "missing field"),
    ("infonce", False, '{"query": "q", "response": null}', "field 'response': missing (null)",
     "missing field"),
    ("infonce", False, '{"query": "", "response": "r"}', "field 'query': empty string",
     "empty field"),
    ("infonce", False, '{"query": "q", "response": " \\n\\t"}',
     "field 'response': empty string", "empty field"),
    ("infonce", False, '{"query": 7, "response": "r"}', "field 'query': expected string, got number",
     "wrong type"),
    ("infonce", False, '{"query": "q", "response": ["r"]}',
     "field 'response': expected string, got list", "wrong type"),
    ("infonce", False, '{"query": "q", "response": "r", "rejected_response": "n"}',
     "field 'rejected_response': expected list, got string", "wrong type"),
    ("infonce", False, '{"query": "q", "response": "r", "rejected_response": ["n", 3]}',
     "field 'rejected_response[1]': expected string, got number", "wrong type"),
    ("infonce", False, '{"query": "q", "response": "r", "rejected_response": [" "]}',
     "field 'rejected_response[0]': empty string", "empty field"),
    ("infonce", True, '{"query": "q", "response": "r", "rejected_response": []}',
     "field 'rejected_response': empty list (require_negatives=True)", "no negatives"),
    ("infonce", True, '{"query": "q", "response": "r"}',
     "field 'rejected_response': missing (require_negatives=True)", "missing field"),
    ("cosine_similarity", False, '{"query": "q", "response": "r"}', "field 'label': missing",
     "missing field"),
    ("cosine_similarity", False, '{"query": "q", "response": "r", "label": 1.5}',
     "field 'label': 1.5 out of range [-1, 1]", "label out of range"),
    ("cosine_similarity", False, '{"query": "q", "response": "r", "label": -2}',
     "field 'label': -2 out of range [-1, 1]", "label out of range"),
    ("cosine_similarity", False, '{"query": "q", "response": "r", "label": NaN}',
     "field 'label': nan out of range [-1, 1]", "label out of range"),
    ("cosine_similarity", False, '{"query": "q", "response": "r", "label": "0.5"}',
     "field 'label': expected number, got string", "wrong type"),
    ("cosine_similarity", False, '{"query": "q", "response": "r", "label": true}',
     "field 'label': expected number, got boolean", "wrong type"),
    ("contrastive", False, '{"query": "q", "response": "r", "label": 0.5}',
     "field 'label': expected 0 or 1 for contrastive, got 0.5", "label out of range"),
    ("online_contrastive", False, '{"query": "q", "response": "r", "label": 2}',
     "field 'label': expected 0 or 1 for online_contrastive, got 2", "label out of range"),
    ("contrastive", False, '{"query": "q", "response": "r", "label": null}',
     "field 'label': missing (null)", "missing field"),
    ("infonce", False, '{"query": "q", "response": "r", "label": 0.0}',
     "field 'label': 0.0 in an infonce row (labelled pairs and infonce rows cannot be mixed: "
     "every row must have the same format)", "labelled pair among infonce rows"),
    ("infonce", False, '{"messages": [{"role": "user", "content": "q"}], '
     '"positive_messages": [[{"role": "user", "content": "p"}]], "label": 0}',
     "field 'label': 0 in an infonce row (labelled pairs and infonce rows cannot be mixed: "
     "every row must have the same format)", "labelled pair among infonce rows"),
    ("infonce", False, '{"messages": [], "positive_messages": [[{"role": "user", "content": "p"}]]}',
     "field 'messages': empty list", "empty field"),
    ("infonce", False, '{"messages": ["q"], "positive_messages": [[{"role": "user", "content": "p"}]]}',
     "field 'messages[0]': expected object, got string", "wrong type"),
    ("infonce", False, '{"messages": [{"role": "user"}], "positive_messages": [[{"content": "p"}]]}',
     "field 'messages[0].content': missing", "missing field"),
    ("infonce", False, '{"messages": [{"role": "user", "content": "q"}]}',
     "field 'positive_messages': missing", "missing field"),
    ("infonce", False, '{"messages": [{"role": "user", "content": "q"}], "positive_messages": []}',
     "field 'positive_messages': empty list", "empty field"),
    ("infonce", False, '{"messages": [{"role": "user", "content": "q"}], '
     '"positive_messages": [[{"role": "user", "content": ""}]]}',
     "field 'positive_messages[0][0].content': empty string", "empty field"),
    ("infonce", False, '{"messages": [{"role": "user", "content": "q"}], '
     '"positive_messages": [[{"content": "p"}]], "negative_messages": [[{"content": 1}]]}',
     "field 'negative_messages[0][0].content': expected string, got number", "wrong type"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("loss_type, require, line, message, reason", BAD_ROWS)
def test_bad_row_error_mode(tmp_path, loss_type, require, line, message, reason):
    good = json.dumps(GOOD[loss_type] | {"rejected_response": ["n"]})
    path = write_jsonl(tmp_path / "train.jsonl", [good, line, good])
    with pytest.raises(DataError) as e:
        load_examples([path], loss_type, require_negatives=require)
    assert str(e.value) == f"{path}:2: {message}"
    assert e.value.reason == reason


@pytest.mark.timeout(60)
@pytest.mark.parametrize("loss_type, require, line, message, reason", BAD_ROWS)
def test_bad_row_skip_mode(tmp_path, loss_type, require, line, message, reason):
    good = json.dumps(GOOD[loss_type] | {"rejected_response": ["n"]})
    path = write_jsonl(tmp_path / "train.jsonl", [good, line, good])
    examples, report = load_examples([path], loss_type, bad_rows="skip",
                                     require_negatives=require)
    assert [e.source for e in examples] == [f"{path}:1", f"{path}:3"]
    assert report.skipped == Counter({reason: 1})
    assert report.messages == [f"{path}:2: {message}"]
    assert report.summary() == f"3 rows read, 1 skipped (1 {reason})"


@pytest.mark.timeout(60)
def test_invalid_utf8_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"query": "q", "response": "r"}\n{"query": "\xff"}\n')
    with pytest.raises(DataError, match=rf"^{path}:2: invalid JSON: not UTF-8"):
        load_examples([str(path)], "infonce")
    examples, report = load_examples([str(path)], "infonce", bad_rows="skip")
    assert len(examples) == 1 and report.skipped == Counter({"invalid JSON": 1})


@pytest.mark.timeout(60)
def test_skip_report_counts_and_keeps_first_ten_messages(tmp_path):
    rows = rows_of(5) + ["{"] * 4 + ['{"query": "q", "response": ""}'] * 8
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    examples, report = load_examples([path], "infonce", bad_rows="skip")
    assert len(examples) == 5
    assert report.summary() == "17 rows read, 12 skipped (8 empty field, 4 invalid JSON)"
    assert report.num_skipped == 12
    assert report.messages == [f"{path}:{n}: invalid JSON: Expecting property name enclosed "
                               f"in double quotes (column 2)" for n in range(6, 10)] + [
        f"{path}:{n}: field 'response': empty string" for n in range(10, 16)]


# -------------------------------------------------------- #N sampling and mixing

@pytest.mark.timeout(60)
def test_subset_is_seeded_without_replacement(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", rows_of(20))
    examples, report = load_examples([f"{path}#8"], "infonce", seed=1)
    queries = [e.query for e in examples]
    assert len(queries) == 8 and len(set(queries)) == 8
    assert report.rows_read == 20
    again, _ = load_examples([f"{path}#8"], "infonce", seed=1)
    other, _ = load_examples([f"{path}#8"], "infonce", seed=2)
    assert [e.query for e in again] == queries
    assert [e.query for e in other] != queries


@pytest.mark.timeout(60)
def test_oversample_repeats_then_samples_the_rest(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", rows_of(5))
    examples, _ = load_examples([f"{path}#13"], "infonce")
    queries = [e.query for e in examples]
    assert queries[:10] == [f"q{i}" for i in range(5)] * 2
    assert len(set(queries[10:])) == 3
    assert sorted(Counter(queries).values()) == [2, 2, 3, 3, 3]


@pytest.mark.timeout(60)
def test_sample_indices_matches_ms_swift_shape():
    assert sample_indices(4, 8, seed=0) == [0, 1, 2, 3, 0, 1, 2, 3]
    assert sample_indices(4, 4, seed=0) == [0, 1, 2, 3]
    assert sample_indices(10, 14, seed=3)[10:] == sample_indices(10, 4, seed=3)
    assert len(set(sample_indices(100, 30, seed=0))) == 30


@pytest.mark.timeout(60)
def test_spec_suffix_parsing(tmp_path):
    odd = write_jsonl(tmp_path / "a#b.jsonl", rows_of(3))
    examples, _ = load_examples([odd], "infonce")
    assert len(examples) == 3
    examples, _ = load_examples([f"{odd}#2"], "infonce")
    assert len(examples) == 2
    with pytest.raises(DataError, match="sample count after '#' must be >= 1"):
        load_examples([f"{odd}#0"], "infonce")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("count", ["-3", "ten", "1.5", ""])
def test_bad_sample_count_of_an_existing_file(tmp_path, count):
    """``a.jsonl#-3`` names the count, not a missing file ``a.jsonl#-3``; the flag check
    (``preflight.check_datasets``) says so before any model loads."""
    from megaemb.preflight import check_datasets

    path = write_jsonl(tmp_path / "a.jsonl", rows_of(3))
    with pytest.raises(DataError, match=f"sample count after '#' must be >= 1, got '{count}'"):
        check_datasets([f"{path}#{count}"], "--dataset")
    with pytest.raises(FileNotFoundError, match="no such file"):  # a missing file stays missing
        check_datasets([str(tmp_path / f"b.jsonl#{count}")], "--dataset")


@pytest.mark.timeout(60)
def test_several_files_concatenate_in_order(tmp_path):
    import datasets

    first = write_jsonl(tmp_path / "a.jsonl", rows_of(4))
    second = str(tmp_path / "b.parquet")
    datasets.Dataset.from_list([{"query": "pq", "response": "pr"}] * 3).to_parquet(second)
    examples, report = load_examples([f"{first}#2", second, first], "infonce")
    assert len(examples) == 2 + 3 + 4
    assert all(e.source.startswith(f"{first}:") for e in examples[:2])
    assert [e.source for e in examples[2:5]] == [f"{second} row {i}" for i in (1, 2, 3)]
    assert [e.query for e in examples[5:]] == ["q0", "q1", "q2", "q3"]
    assert report.rows_read == 4 + 3 + 4


# ------------------------------------------------------------------- real data

@pytest.mark.timeout(60)
def test_real_debian_desc_rows(tmp_path):
    path = tmp_path / "train.jsonl"
    with open(REAL_TRAIN, encoding="utf-8") as src, open(path, "w", encoding="utf-8") as dst:
        dst.writelines(line for _, line in zip(range(200), src))
    examples, report = load_examples([str(path)], "infonce", require_negatives=True)
    assert len(examples) == 200
    assert report.summary() == "200 rows read, 0 skipped"
    assert all(len(e.negatives) == 3 for e in examples)
    assert all(e.query.strip() and e.response.strip() and e.label is None for e in examples)
    assert examples[199].source == f"{path}:200"


@pytest.mark.timeout(60)
def test_csv_cells_are_text_and_rows_are_not_called_lines(tmp_path):
    """A CSV cell reading ``NA`` / ``null`` / ``nan`` is that text (pandas would make it null);
    a bad row below a quoted multi-line cell is named ``row N``, not ``:N`` (not its line)."""
    from megaemb.data.formats import RowReport, iter_examples

    path = tmp_path / "emb.csv"
    path.write_text('query,response\n"multi\nline",NA\nnull,nan\nq,\n')
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))} row 3: field 'response'"):
        list(iter_examples(str(path), "infonce", "error", False, RowReport()))
    rows = list(iter_examples(str(path), "infonce", "skip", False, RowReport()))
    assert [(e.query, e.response) for e in rows] == [("multi\nline", "NA"), ("null", "nan")], rows
