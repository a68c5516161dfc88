"""Labelled examples for fine-tuning: CSV / TSV / JSONL with named columns, CoNLL and JSONL tokens/tags, label maps.

Every reader returns a list of example dicts, each with a ``source`` (``file:line``) so later checks
can name where a bad value came from:

* sentence tasks: ``{"text", "text_pair" (None for single texts), "label" (None when not read)}``;
  ``.csv`` (comma), ``.tsv`` / ``.tab`` (tab) with a header row, or ``.jsonl`` / ``.json`` (one object a line);
* token tasks: ``{"tokens": [...], "tags": [...]}``; CoNLL (``token<TAB>tag`` a line, a blank line
  between sentences; any suffix but ``.jsonl``/``.json``) or JSONL with ``tokens`` and ``tags`` lists.

Bad input is one :class:`BertopsError` naming file and line: an empty file, a missing column, a
text column with bytes that are not UTF-8, a ragged CSV row or CoNLL line, a label in the eval
data that training never saw (:func:`check_labels`). Input functions (callables returning
iterables of dicts) go through :func:`examples_from` and the same checks.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bertops.errors import BertopsError

CSV_SUFFIXES = {".csv": ",", ".tsv": "\t", ".tab": "\t"}
JSONL_SUFFIXES = (".jsonl", ".json")
OUTSIDE = "O"  # the IOB "no entity" tag; sorts first in a label map


@dataclass(frozen=True)
class Columns:
    """Which columns (CSV header names or JSON keys) hold what."""

    text: str = "text"
    text_pair: str | None = None  # second text of a pair (pair classification; embeddings default to "text_pair")
    label: str = "label"
    tokens: str = "tokens"  # JSONL token tasks
    tags: str = "tags"


# --- reading files ----------------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    """The file as text; undecodable bytes are kept as surrogates so the field that holds them can be named."""
    if not path.is_file():
        raise BertopsError(f"{path} does not exist; pass a data file")
    raw = path.read_bytes()
    if not raw.strip():
        raise BertopsError(f"{path}:1: the file is empty; pass a file with examples")
    return raw.decode("utf-8", errors="surrogateescape")


def _utf8(value, where: str, column: str) -> str:
    if not isinstance(value, str):
        raise BertopsError(f"{where}: column {column!r} is {type(value).__name__}, not text")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        byte = ord(value[exc.start]) - 0xDC00
        raise BertopsError(
            f"{where}: column {column!r} holds bytes that are not UTF-8 (0x{byte:02x}); re-encode the file, "
            "e.g. `iconv -f latin1 -t utf-8`"
        ) from None
    return value


def _surrogate_line(text: str, path: Path) -> None:
    """Token files have no columns to blame: name the first line with non-UTF-8 bytes."""
    for n, line in enumerate(text.splitlines(), 1):
        try:
            line.encode("utf-8")
        except UnicodeEncodeError as exc:
            byte = ord(line[exc.start]) - 0xDC00
            raise BertopsError(
                f"{path}:{n}: bytes that are not UTF-8 (0x{byte:02x}); re-encode the file, e.g. `iconv -f latin1 -t utf-8`"
            ) from None


def _csv_rows(path: Path, text: str) -> Iterable[tuple[str, dict]]:
    delimiter = CSV_SUFFIXES[path.suffix.lower()]
    reader = csv.reader(text.splitlines(), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        raise BertopsError(f"{path}:1: the file is empty; pass a file with a header row and examples") from None
    header = [h.strip() for h in header]
    count = 0
    for row in reader:
        where = f"{path}:{reader.line_num}"
        if not row or not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise BertopsError(
                f"{where}: {len(row)} fields but the header names {len(header)} ({', '.join(header)}); "
                "quote fields that contain the delimiter"
            )
        count += 1
        yield where, dict(zip(header, row))
    if not count:
        raise BertopsError(f"{path}:2: the file has a header but no examples")


def _jsonl_rows(path: Path, text: str) -> Iterable[tuple[str, dict]]:
    count = 0
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BertopsError(f"{where}: not valid JSON ({exc.msg}); one JSON object per line") from None
        if not isinstance(row, dict):
            raise BertopsError(f"{where}: a JSON {type(row).__name__}, not an object; one JSON object per line")
        count += 1
        yield where, row
    if not count:
        raise BertopsError(f"{path}:1: the file has no examples")


def _field(row: dict, key: str, where: str, flag: str, available) -> object:
    if key not in row:
        names = ", ".join(map(str, available)) or "none"
        raise BertopsError(f"{where}: no column {key!r} (columns: {names}); pass {flag} with the right name")
    return row[key]


def read_sentences(path: str | Path, columns: Columns, *, label: bool, pair: bool) -> list[dict]:
    """CSV / TSV / JSONL -> ``{"text", "text_pair", "label", "source"}`` examples."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in CSV_SUFFIXES and suffix not in JSONL_SUFFIXES:
        raise BertopsError(f"{path}: unknown format {suffix or '(no suffix)'}; use .csv, .tsv or .jsonl")
    text = _read_text(path)
    rows = _csv_rows(path, text) if suffix in CSV_SUFFIXES else _jsonl_rows(path, text)
    pair_column = columns.text_pair or ("text_pair" if pair else None)
    out = []
    for where, row in rows:
        keys = list(row)
        if suffix in CSV_SUFFIXES and not out:  # a CSV column is missing from the header, line 1
            for key, flag in ((columns.text, "--text-column"), (pair_column, "--text-pair-column"),
                              (columns.label if label else None, "--label-column")):
                if key:
                    _field(row, key, f"{path}:1", flag, keys)
        ex = {"text": _utf8(_field(row, columns.text, where, "--text-column", keys), where, columns.text),
              "text_pair": None, "label": None, "source": where}
        if pair_column:
            ex["text_pair"] = _utf8(_field(row, pair_column, where, "--text-pair-column", keys), where, pair_column)
        if label:
            value = _field(row, columns.label, where, "--label-column", keys)
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise BertopsError(f"{where}: label {value!r} is not a string or number")
            ex["label"] = _utf8(str(value), where, columns.label).strip()
            if not ex["label"]:
                raise BertopsError(f"{where}: the label column {columns.label!r} is empty")
        elif pair and columns.label in row:  # embeddings: an optional similarity score (Spearman)
            try:
                ex["label"] = float(row[columns.label])
            except (TypeError, ValueError):
                raise BertopsError(f"{where}: score {row[columns.label]!r} in column {columns.label!r} is not a number") from None
        out.append(ex)
    return out


def read_tokens(path: str | Path, columns: Columns) -> list[dict]:
    """CoNLL (``token<TAB>tag``, blank line between sentences) or JSONL tokens/tags -> ``{"tokens", "tags", "source"}``."""
    path = Path(path)
    text = _read_text(path)
    _surrogate_line(text, path)
    if path.suffix.lower() in JSONL_SUFFIXES:
        out = []
        for where, row in _jsonl_rows(path, text):
            tokens = _field(row, columns.tokens, where, "--tokens-column", list(row))
            tags = _field(row, columns.tags, where, "--tags-column", list(row))
            out.append(_token_example(tokens, tags, where))
        return out
    out, tokens, tags, start = [], [], [], 0
    for n, line in enumerate(text.splitlines() + [""], 1):
        if not line.strip():
            if tokens:
                out.append({"tokens": tokens, "tags": tags, "source": f"{path}:{start}"})
            tokens, tags = [], []
            continue
        fields = line.rstrip("\r\n").split("\t")
        if len(fields) != 2 or not fields[0].strip() or not fields[1].strip():
            raise BertopsError(
                f"{path}:{n}: expected token<TAB>tag, got {len(fields)} tab-separated field(s) {line.strip()[:40]!r}; "
                "one token and its tag per line, a blank line between sentences"
            )
        if not tokens:
            start = n
        tokens.append(fields[0].strip())
        tags.append(fields[1].strip())
    if not out:
        raise BertopsError(f"{path}:1: the file has no sentences")
    return out


def _token_example(tokens, tags, where: str) -> dict:
    if not isinstance(tokens, list) or not isinstance(tags, list) or not all(isinstance(t, str) for t in tokens + tags):
        raise BertopsError(f"{where}: tokens and tags must be lists of strings")
    if len(tokens) != len(tags):
        raise BertopsError(f"{where}: {len(tokens)} tokens but {len(tags)} tags; every token needs one tag")
    if not tokens:
        raise BertopsError(f"{where}: a sentence without tokens")
    return {"tokens": [t.strip() for t in tokens], "tags": [t.strip() for t in tags], "source": where}


# --- input functions and the task's reader ----------------------------------------------------------


def example_kind(task) -> str:
    """Which reader a task's data goes through: "tokens" (token-level labels), "labelled" (text [+ pair] + label), "pairs"."""
    if task.token_level and task.needs_labels:
        return "tokens"
    return "labelled" if task.needs_labels else "pairs"


def examples_from(source: str | Path | Callable[[], Iterable[dict]] | Sequence[dict], kind: str,
                  columns: Columns = Columns()) -> list[dict]:
    """A file, an input function (called once), or a list of dicts -> checked examples of ``kind``."""
    if isinstance(source, (str, Path)):
        if kind == "tokens":
            return read_tokens(source, columns)
        return read_sentences(source, columns, label=kind == "labelled", pair=kind == "pairs")
    rows = source() if callable(source) else source
    out = []
    for i, row in enumerate(rows, 1):
        where = f"input example {i}"
        if not isinstance(row, dict):
            raise BertopsError(f"{where}: got {type(row).__name__}; an input function yields dicts")
        where = row.get("source") or where
        if kind == "tokens":
            ex = _token_example(_field(row, "tokens", where, "a 'tokens' key", list(row)),
                                _field(row, "tags", where, "a 'tags' key", list(row)), where)
        else:
            ex = {"text": _utf8(_field(row, "text", where, "a 'text' key", list(row)), where, "text"),
                  "text_pair": row.get("text_pair"), "label": None, "source": where}
            if kind == "pairs":
                ex["text_pair"] = _utf8(_field(row, "text_pair", where, "a 'text_pair' key", list(row)), where, "text_pair")
                if row.get("label") is not None:
                    ex["label"] = row["label"]  # an optional similarity score
            else:
                ex["label"] = str(_field(row, "label", where, "a 'label' key", list(row))).strip()
        out.append(ex)
    if not out:
        raise BertopsError("the input function returned no examples")
    return out


# --- label maps -------------------------------------------------------------------------------------


def labels_of(examples: Sequence[dict], kind: str) -> list[str]:
    """Every label (or tag) in the examples, "O" first, the rest sorted."""
    seen = {t for ex in examples for t in ex["tags"]} if kind == "tokens" else {ex["label"] for ex in examples}
    return sorted(seen, key=lambda name: (name != OUTSIDE, name))


def check_labels(examples: Sequence[dict], kind: str, known: Sequence[str], what: str = "training data") -> None:
    """A label the model cannot output -> one line naming where it occurs."""
    known = set(known)
    for ex in examples:
        found = [t for t in ex["tags"] if t not in known] if kind == "tokens" else (
            [ex["label"]] if ex["label"] not in known else [])
        if found:
            shown = ", ".join(sorted(known)[:12]) + (", ..." if len(known) > 12 else "")
            raise BertopsError(f"{ex['source']}: label {found[0]!r} does not occur in the {what} (labels: {shown})")


def is_iob(labels: Sequence[str]) -> bool:
    """Whether a tag set is IOB/BIO-style (``O``, ``B-X``, ``I-X``), as opposed to plain tags such as POS."""
    return bool(labels) and all(t == OUTSIDE or (len(t) > 2 and t[1] == "-" and t[0] in "BI") for t in labels) and any(
        t.startswith("B-") for t in labels)
