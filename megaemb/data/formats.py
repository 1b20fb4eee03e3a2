"""Training / eval files -> validated ``Example`` rows (ms-swift's embedding formats).

Dataset specs are paths, optionally with ms-swift's ``#N`` suffix ("take N samples"):

    train.jsonl           JSON lines, one object per line (blank lines are not rows)
    train.json            a JSON array of objects, or JSON lines
    train.csv             header row + one row per example (datasets' csv reader)
    train.parquet         one row per example
    train_dir/            a ``datasets`` folder written by ``Dataset.save_to_disk``
    train.jsonl#5000      N < rows: a seeded random subset without replacement;
                          N > rows: every row repeated N // rows times, plus a seeded
                          random subset of N % rows rows (as ms-swift's ``sample_dataset``)

Row formats (extra fields are ignored):

    infonce              {"query": str, "response": str, "rejected_response": [str, ...]}
                         rejected_response is optional; an empty list is an error only
                         with ``require_negatives=True``
    cosine_similarity    {"query": str, "response": str, "label": float in [-1, 1]}
    contrastive,
    online_contrastive   {"query": str, "response": str, "label": 0 | 1}
                         (0/1 ints, 0.0/1.0 floats and booleans are accepted)
    messages form        {"messages": [{"role": "user", "content": q}, ...],
                          "positive_messages": [[{"role": "user", "content": p}], ...],
                          "negative_messages": [[...], ...], "label": ...}
                         the text of a message list is the content of its last "user"
                         message (the last message if none has role "user"); only the
                         first entry of positive_messages is used.

Negatives are read only for ``infonce``; labels only for the labelled losses. Every row of a
file must have the shape of the format it is read as, whatever its first row looked like: a
row with a ``label`` (not null) among infonce rows is an error (``field 'label': ...``), as
is a row without one among labelled pairs (a label-0 pair must never become a positive).

Every malformed row raises ``DataError`` naming file, line and field, e.g.
``train.jsonl:17: field 'response': empty string``. Lines are 1-based file lines for
JSONL and for a JSON array's element alone on its lines, else ``train.json[5]`` (0-based); csv, parquet and folders
say ``train.csv row 5`` (1-based data rows, header excluded). CSV cells are text: only an
empty cell is missing (``NA`` or ``null`` are strings).
With ``bad_rows="skip"`` malformed rows are skipped and counted in ``RowReport`` instead;
a JSON array that cannot be parsed is always fatal (its rows cannot be delimited).
"""
from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

LOSS_TYPES = ("infonce", "cosine_similarity", "contrastive", "online_contrastive")
# how files are read: a loss type, or "sts" (evaluation pairs: any finite label, e.g. STS-B's 0-5)
READ_MODES = (*LOSS_TYPES, "sts")
BAD_ROW_POLICIES = ("error", "skip")
MAX_KEPT_MESSAGES = 10

# Reasons a row is rejected: the keys of ``RowReport.skipped``.
INVALID_JSON = "invalid JSON"
NOT_OBJECT = "not an object"
MISSING_FIELD = "missing field"
EMPTY_FIELD = "empty field"
WRONG_TYPE = "wrong type"
BAD_LABEL = "label out of range"
NO_NEGATIVES = "no negatives"
WRONG_FORMAT = "labelled pair among infonce rows"


class DataError(ValueError):
    """A data file or row that cannot be used; ``reason`` is one of the reasons above
    for row errors, None for file-level errors."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason


class BadRow(Exception):
    """A row problem before its location is known."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass
class Example:
    """One training pair. ``label`` is None for infonce; ``source`` is ``"file:line"``, ``"file[i]"`` or ``"file row N"`` (``file_rows``)."""

    query: str
    response: str
    negatives: list[str]
    label: float | None
    source: str


@dataclass
class RowReport:
    """What loading read and skipped: counts per reason and the first messages."""

    rows_read: int = 0
    skipped: Counter = field(default_factory=Counter)
    messages: list[str] = field(default_factory=list)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def add_skip(self, error: DataError) -> None:
        self.skipped[error.reason] += 1
        if len(self.messages) < MAX_KEPT_MESSAGES:
            self.messages.append(str(error))

    def summary(self) -> str:
        """E.g. ``"20000 rows read, 3 skipped (2 empty field, 1 invalid JSON)"``."""
        text = f"{self.rows_read} rows read, {self.num_skipped} skipped"
        if self.skipped:
            text += " (" + ", ".join(f"{n} {r}" for r, n in self.skipped.most_common()) + ")"
        return text


# ---------------------------------------------------------------------------- fields

def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _field(name: str, detail: str, reason: str) -> BadRow:
    return BadRow(reason, f"field '{name}': {detail}")


def _require(row: dict, key: str, name: str | None = None) -> Any:
    """The value of a required key (reported as field ``name``, default the key);
    a missing key and null are both 'missing'."""
    name = name or key
    if key not in row:
        raise _field(name, "missing", MISSING_FIELD)
    if row[key] is None:
        raise _field(name, "missing (null)", MISSING_FIELD)
    return row[key]


def _text(value: Any, name: str) -> str:
    """A non-empty, not whitespace-only string."""
    if not isinstance(value, str):
        raise _field(name, f"expected string, got {_json_type(value)}", WRONG_TYPE)
    if not value.strip():
        raise _field(name, "empty string", EMPTY_FIELD)
    return value


def _list(value: Any, name: str) -> list:
    if not isinstance(value, (list, tuple)):
        raise _field(name, f"expected list, got {_json_type(value)}", WRONG_TYPE)
    return list(value)


def _label(row: dict, loss_type: str) -> float:
    """cosine_similarity: a finite number in [-1, 1]; (online_)contrastive: 0 or 1; sts: any
    finite number (only its order and linear trend are scored)."""
    value = _require(row, "label")
    binary = loss_type not in ("cosine_similarity", "sts")
    if isinstance(value, bool):
        if binary:
            return float(value)
        raise _field("label", "expected number, got boolean", WRONG_TYPE)
    if not isinstance(value, (int, float)):
        raise _field("label", f"expected number, got {_json_type(value)}", WRONG_TYPE)
    if binary and value not in (0, 1):
        raise _field("label", f"expected 0 or 1 for {loss_type}, got {value}", BAD_LABEL)
    if loss_type == "sts" and not math.isfinite(value):
        raise _field("label", f"{value} is not finite", BAD_LABEL)
    if loss_type != "sts" and (not math.isfinite(value) or not -1.0 <= value <= 1.0):
        raise _field("label", f"{value} out of range [-1, 1]", BAD_LABEL)
    return float(value)


def is_labelled(row: Any) -> bool:
    """Whether a parsed row is a labelled pair (a ``label`` that is not null; a Parquet / CSV
    column holds null where a row has none) rather than an infonce row."""
    return isinstance(row, dict) and row.get("label") is not None


def row_text(row: Any, name: str) -> str:
    """Field ``name`` of a parsed row: a non-empty string, or ``BadRow`` (``field 'name': ...``)."""
    if not isinstance(row, dict):
        raise BadRow(NOT_OBJECT, f"expected a JSON object, got {_json_type(row)}")
    return _text(_require(row, name), name)


def _message_text(value: Any, name: str) -> str:
    """Text of a message list: content of the last user message, else of the last one."""
    messages = _list(value, name)
    if not messages:
        raise _field(name, "empty list", EMPTY_FIELD)
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _field(f"{name}[{i}]", f"expected object, got {_json_type(message)}",
                         WRONG_TYPE)
    users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    i = users[-1] if users else len(messages) - 1
    return _text(_require(messages[i], "content", f"{name}[{i}].content"),
                 f"{name}[{i}].content")


# ------------------------------------------------------------------------------ rows

def _negatives(row: dict, name: str, require: bool, text_of) -> list[str]:
    """The optional list field ``name``, each item validated by ``text_of(item, name)``."""
    if row.get(name) is None:
        if require:
            raise _field(name, "missing (require_negatives=True)", MISSING_FIELD)
        return []
    items = _list(row[name], name)
    if not items and require:
        raise _field(name, "empty list (require_negatives=True)", NO_NEGATIVES)
    return [text_of(item, f"{name}[{i}]") for i, item in enumerate(items)]


def _parse_row(row: Any, loss_type: str, require_negatives: bool) -> tuple:
    """-> ``(query, response, negatives, label)``, or raise ``BadRow``."""
    if not isinstance(row, dict):
        raise BadRow(NOT_OBJECT, f"expected a JSON object, got {_json_type(row)}")
    infonce = loss_type == "infonce"
    if infonce and is_labelled(row):
        raise _field("label", f"{row['label']!r} in an infonce row (labelled pairs and infonce "
                     "rows cannot be mixed: every row must have the same format)", WRONG_FORMAT)
    if "messages" in row:
        query = _message_text(_require(row, "messages"), "messages")
        positives = _list(_require(row, "positive_messages"), "positive_messages")
        if not positives:
            raise _field("positive_messages", "empty list", EMPTY_FIELD)
        response = _message_text(positives[0], "positive_messages[0]")
        neg_field, neg_text = "negative_messages", _message_text
    else:
        query = _text(_require(row, "query"), "query")
        response = _text(_require(row, "response"), "response")
        neg_field, neg_text = "rejected_response", _text
    negatives = _negatives(row, neg_field, require_negatives, neg_text) if infonce else []
    label = None if infonce else _label(row, loss_type)
    return query, response, negatives, label


# ----------------------------------------------------------------------------- files

def json_lines(path: str) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed object or BadRow)`` for each non-blank line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield lineno, BadRow(INVALID_JSON, f"invalid JSON: not UTF-8 ({e.reason})")
                continue
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                yield lineno, BadRow(INVALID_JSON, f"invalid JSON: {e.msg} (column {e.colno})")


def _json_array(path: str, text: str) -> Iterator[tuple[str, Any]]:
    """``(where, element)`` for each element of a top-level JSON array: ``where`` is ``:LINE``
    for an element sharing its lines with no other, else ``[INDEX]`` (0-based; a line would not
    name the 6th element of a one-line array)."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1

    def skip_space(i: int) -> int:
        while i < len(text) and text[i].isspace():
            i += 1
        return i

    def fail(i: int, what: str) -> DataError:
        line = text.count("\n", 0, i) + 1
        return DataError(f"{path}:{line}: invalid JSON array: {what}", INVALID_JSON)

    pos, index, prev_end_line = skip_space(pos), 0, -1
    line = text.count("\n", 0, pos) + 1  # of pos; advanced incrementally
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise fail(e.pos, e.msg) from None
        start_line, end_line = line, line + text.count("\n", pos, end)
        after = skip_space(end)
        after = skip_space(after + 1) if after < len(text) and text[after] == "," else after
        next_line = end_line + text.count("\n", end, after)
        alone = start_line != prev_end_line and (next_line != end_line or after >= len(text)
                                                  or text[after] == "]")
        yield (f":{start_line}" if alone else f"[{index}]"), value
        index, prev_end_line, line = index + 1, end_line, end_line
        pos = skip_space(end)
        if pos >= len(text):
            raise fail(pos, "missing ']'")
        if text[pos] == "]":
            break
        if text[pos] != ",":
            raise fail(pos, "expected ',' or ']'")
        line += text.count("\n", end, skip_space(pos + 1))
        pos = skip_space(pos + 1)
    if skip_space(pos + 1) != len(text):
        raise fail(pos + 1, "extra data after ']'")


def _json_file(path: str) -> Iterator[tuple[int, Any]]:
    """A ``.json`` file: a JSON array of objects, or JSON lines."""
    with open(path, "rb") as f:
        data = f.read()
    if not data.removeprefix(b"\xef\xbb\xbf").lstrip().startswith(b"["):
        return json_lines(path)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})", INVALID_JSON) from None
    return _json_array(path, text)


def _parquet_rows(path: str) -> Iterator[tuple[int, Any]]:
    """A parquet file, streamed one record batch at a time; 1-based row numbers."""
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=4096)
    except Exception as e:  # not parquet, or a damaged footer
        raise DataError(f"{path}: cannot read: {e}") from e
    number = 0
    while True:
        try:
            batch = next(batches, None)
        except Exception as e:  # a damaged row group
            raise DataError(f"{path}: cannot read after row {number}: {e}") from e
        if batch is None:
            return
        for row in batch.to_pylist():
            number += 1
            yield number, row


def _table_rows(path: str) -> Iterator[tuple[int, Any]]:
    """csv / ``save_to_disk`` folder via ``datasets`` (a folder is memory-mapped, a csv read
    whole); 1-based row numbers."""
    import datasets

    try:
        if os.path.isdir(path):
            table = datasets.load_from_disk(path)
        else:
            # cells stay text: "NA", "null", "nan" are strings; only an empty cell is missing
            table = datasets.Dataset.from_csv(path, keep_in_memory=True, keep_default_na=False,
                                              na_values=[""])
    except Exception as e:  # datasets raises many types for unreadable files
        raise DataError(f"{path}: cannot read: {e}") from e
    if isinstance(table, datasets.DatasetDict):
        raise DataError(f"{path}: a DatasetDict with splits {sorted(table)}; "
                        f"pass one split's folder, e.g. {os.path.join(path, 'train')}")
    return enumerate(table, start=1)


SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
FILE_TYPES = ".jsonl, .json, .csv, .parquet or a folder written by datasets' save_to_disk"


def supported(path: str) -> bool:
    """Whether ``file_rows`` reads ``path``'s type (a suffix of ``SUFFIXES`` or a folder)."""
    return path.endswith(SUFFIXES) or os.path.isdir(path)


def file_rows(path: str) -> Iterator[tuple[str, Any]]:
    """``(where, parsed row or BadRow)`` of any supported file or folder; ``f"{path}{where}"``
    names the row: ``:LINE`` (the file line) for JSON lines, ``[INDEX]`` (0-based) for an
    element of a JSON array, `` row N`` (1-based, header excluded) for csv, parquet and
    folders (a quoted multi-line csv cell makes a row's number differ from its line)."""
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    if not supported(path):
        raise DataError(f"{path}: unsupported file type; expected {FILE_TYPES}")
    if path.endswith(".jsonl"):
        rows, form = json_lines(path), ":{}"
    elif path.endswith(".json"):
        rows = _json_file(path)
        form = ":{}" if rows.__name__ == "json_lines" else "{}"  # _json_array says where
    elif path.endswith(".parquet"):
        rows, form = _parquet_rows(path), " row {}"
    else:
        rows, form = _table_rows(path), " row {}"
    return ((form.format(n), row) for n, row in rows)


def _example_parser(loss_type: str, require_negatives: bool):
    """The ``parse`` of ``iter_parsed`` for embedding rows: a row -> ``Example``."""
    return lambda row, source: Example(*_parse_row(row, loss_type, require_negatives), source)


def iter_parsed(path: str, parse, bad_rows: str, report: RowReport) -> Iterator:
    """``parse(row, source)`` of each valid row of one file, in file order, one at a time (a
    JSONL file is read line by line: memory does not grow with the file). ``parse`` raises
    ``BadRow`` for a malformed row; bad rows are raised as ``DataError`` (``file:line: ...``)
    or counted in ``report`` as ``bad_rows`` says; a file with no valid row raises ``DataError``
    at its end."""
    valid = 0
    for where, row in file_rows(path):
        report.rows_read += 1
        source = f"{path}{where}"
        try:
            if isinstance(row, BadRow):
                raise row
            parsed = parse(row, source)
        except BadRow as bad:
            error = DataError(f"{source}: {bad.detail}", bad.reason)
            if bad_rows == "error":
                raise error from None
            report.add_skip(error)
            continue
        valid += 1
        yield parsed
    if not valid:
        raise DataError(f"{path}: no valid rows")


def iter_examples(path: str, loss_type: str, bad_rows: str, require_negatives: bool,
                  report: RowReport) -> Iterator[Example]:
    """The valid rows of one file as ``Example``s (see ``iter_parsed``)."""
    return iter_parsed(path, _example_parser(loss_type, require_negatives), bad_rows, report)


# -------------------------------------------------------------------------- sampling

def parse_spec(spec: str) -> tuple[str, int | None]:
    """``"path#N"`` -> ``(path, N)``; ``"path"`` -> ``(path, None)``. A '#' in a path is kept
    when what follows is no count; a path that exists with anything but a count >= 1 after
    its '#' (``a.jsonl#-3``, ``a.jsonl#ten``) is a ``DataError``."""
    path, sep, count = spec.rpartition("#")
    if not sep or (not count.isdigit() and (os.path.exists(spec) or not os.path.exists(path))):
        return spec, None
    if not count.isdigit() or int(count) < 1:
        raise DataError(f"{spec}: sample count after '#' must be >= 1, got {count!r}")
    return path, int(count)


def sample_indices(num_rows: int, count: int, seed: int) -> list[int]:
    """ms-swift's ``sample_dataset``: ``count // num_rows`` full copies of the rows in
    order, then a seeded random subset (without replacement) of ``count % num_rows``."""
    repeats, remainder = divmod(count, num_rows)
    rest = np.random.default_rng(seed).permutation(num_rows)[:remainder]
    return list(range(num_rows)) * repeats + rest.tolist()


def load_parsed(specs: list[str], parse, bad_rows: str, seed: int) -> tuple[list, RowReport]:
    """``iter_parsed`` over every spec, each spec's ``#N`` sampling applied, concatenated in
    order. A missing file, an unreadable file and a file with no valid rows raise ``DataError``."""
    if bad_rows not in BAD_ROW_POLICIES:
        raise ValueError(f"bad_rows must be one of {BAD_ROW_POLICIES}, got {bad_rows!r}")
    if not specs:
        raise DataError("no dataset given")
    report = RowReport()
    rows: list = []
    for spec in specs:
        path, count = parse_spec(spec)
        parsed = list(iter_parsed(path, parse, bad_rows, report))
        if count is not None:
            parsed = [parsed[i] for i in sample_indices(len(parsed), count, seed)]
        rows.extend(parsed)
    return rows, report


def load_examples(specs: list[str], loss_type: str, *, bad_rows: str = "error",
                  seed: int = 42, require_negatives: bool = False
                  ) -> tuple[list[Example], RowReport]:
    """Read and validate every spec, apply its ``#N`` sampling, concatenate in order.

    ``bad_rows``: "error" raises ``DataError`` at the first malformed row; "skip" skips
    and counts it in the returned ``RowReport``. A missing file, an unreadable file and
    a file with no valid rows always raise ``DataError``.
    """
    if loss_type not in READ_MODES:
        raise ValueError(f"loss_type must be one of {READ_MODES}, got {loss_type!r}")
    return load_parsed(specs, _example_parser(loss_type, require_negatives), bad_rows, seed)
