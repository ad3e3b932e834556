"""The input corpus of ``POST /evaluate``: files the service must refuse, and files it must
accept and score exactly as their rows say.

Every case is built here in code (no binary files in the repository). A rejected case names
the status, the error type and the fragments its message must contain (the problem, and the
row and column where there is one). An accepted case lists the rows it means, written out
independently of the readers, so the test compares the service's report with scores of those
rows computed without the service.
"""

from __future__ import annotations

import codecs
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from nli.labels import LABELS

# The corpus service's limits (the defaults, but a smaller upload limit so that files over it
# stay cheap to send; a 10 MB line still fits under it).
MAX_TEXT_CHARS = 2000
MAX_UPLOAD_BYTES = 16 * 1024 * 1024
TEN_MB = 10 * 1000 * 1000

Row = tuple[str, str, int]  # premise, hypothesis, label id

# Texts whose predictions (tiny model: base and adapter "alpha") are at least 1e-3 from a tie,
# well above the ~4e-4 by which batched and sequential scores differ.
TEXTS = [
    ("a man is playing guitar in the park", "a man plays music"),
    ("two dogs are running on the beach", "the dogs are not outside"),
    ("a woman is eating at a big red table", "nobody is eating"),
    ("the child is sitting", "a child is sitting inside"),
    ("people sit at a table in the room", "people are inside"),
    ("an old man with a bike", "a young woman is running in the snow"),
]
HEADER = "premise,hypothesis,label"


@dataclass(frozen=True)
class Rejected:
    """A file the service must refuse without storing anything."""

    status: int
    type: str
    says: tuple[str, ...]  # fragments of the message: the problem, row and column


@dataclass(frozen=True)
class Accepted:
    """A file the service must score: exactly these rows, and this many dropped."""

    rows: Sequence[Row]
    dropped: int = 0
    as_job: bool = False


@dataclass(frozen=True)
class Case:
    id: str
    category: str
    filename: str
    content: bytes
    expect: Rejected | Accepted
    notes: dict[str, Any] = field(default_factory=dict)


def rows(n: int, *, offset: int = 0) -> list[Row]:
    """``n`` rows cycling through the texts and the labels."""
    return [(*TEXTS[(i + offset) % len(TEXTS)], (i + offset) % 3) for i in range(n)]


def jsonl(records: Sequence[dict[str, Any]], *, newline: str = "\n") -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + newline for r in records).encode()


def records(data: Sequence[Row]) -> list[dict[str, Any]]:
    return [{"premise": p, "hypothesis": h, "label": LABELS[y]} for p, h, y in data]


def csv_text(lines: Sequence[str], *, newline: str = "\n") -> bytes:
    return "".join(line + newline for line in lines).encode()


def csv_rows(data: Sequence[Row]) -> list[str]:
    return [HEADER, *(f"{p},{h},{LABELS[y]}" for p, h, y in data)]


def parquet(data: Sequence[Row]) -> bytes:
    table = pa.table(
        {
            "premise": [p for p, _, _ in data],
            "hypothesis": [h for _, h, _ in data],
            "label": [LABELS[y] for _, _, y in data],
        }
    )
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def csv_quote(text: str) -> str:
    return '"' + text.replace('"', '""') + '"'


def rejected_cases() -> list[Case]:
    good = records(rows(5))
    cases = [
        # -- structure -------------------------------------------------------------------------
        Case(
            "empty-file",
            "structure",
            "data.jsonl",
            b"",
            Rejected(400, "invalid_data", ("empty file",)),
        ),
        Case(
            "header-only",
            "structure",
            "data.csv",
            csv_text([HEADER]),
            Rejected(400, "invalid_data", ("no rows",)),
        ),
        Case(
            "missing-required-column",
            "structure",
            "data.csv",
            csv_text(["premise,label", "a man is sitting,neutral"]),
            Rejected(400, "invalid_data", ("missing required column", "hypothesis")),
        ),
        Case(
            "missing-field-in-some-rows",
            "structure",
            "data.jsonl",
            jsonl([*good[:2], {"premise": "a dog", "label": "neutral"}, *good[2:]]),
            Rejected(400, "invalid_data", ("missing field", "row 3", "column 'hypothesis'")),
        ),
        Case(
            "missing-cell-in-some-rows",
            "structure",
            "data.csv",
            csv_text([*csv_rows(rows(3)), "a cat on a mat,a cat"]),
            Rejected(400, "invalid_data", ("missing field", "row 4", "column 'label'")),
        ),
        Case(
            "nested-object-as-text",
            "structure",
            "data.jsonl",
            jsonl([good[0], {**good[1], "premise": {"text": "a man", "lang": "en"}}]),
            Rejected(
                400, "invalid_data", ("expected text, got an object", "row 2", "column 'premise'")
            ),
        ),
        Case(
            "nested-list-as-text",
            "structure",
            "data.json",
            json.dumps([good[0], good[1], {**good[2], "hypothesis": ["a", "b"]}]).encode(),
            Rejected(
                400, "invalid_data", ("expected text, got a list", "row 3", "column 'hypothesis'")
            ),
        ),
        Case(
            "json-list-of-strings",
            "structure",
            "data.json",
            json.dumps(["a man", "a dog"]).encode(),
            Rejected(400, "invalid_data", ("expected a JSON object", "row 1")),
        ),
        # -- values ----------------------------------------------------------------------------
        Case(
            "unknown-label",
            "values",
            "data.csv",
            csv_text([*csv_rows(rows(3)), "a dog runs,an animal runs,maybe"]),
            Rejected(400, "invalid_data", ("unknown label 'maybe'", "row 4", "column 'label'")),
        ),
        Case(
            "label-out-of-range",
            "values",
            "data.jsonl",
            jsonl([*good[:1], {**good[1], "label": 7}]),
            Rejected(400, "invalid_data", ("unknown label 7", "row 2", "column 'label'")),
        ),
        Case(
            "null-text",
            "values",
            "data.jsonl",
            jsonl([*good[:3], {**good[3], "premise": None}]),
            Rejected(400, "invalid_data", ("null value", "row 4", "column 'premise'")),
        ),
        Case(
            "null-label",
            "values",
            "data.jsonl",
            jsonl([{**good[0], "label": None}]),
            Rejected(400, "invalid_data", ("null label", "row 1", "column 'label'")),
        ),
        Case(
            "empty-string",
            "values",
            "data.jsonl",
            jsonl([*good[:1], {**good[1], "hypothesis": ""}]),
            Rejected(400, "invalid_data", ("empty", "row 2", "column 'hypothesis'")),
        ),
        Case(
            "whitespace-only-cell",
            "values",
            "data.csv",
            csv_text([HEADER, "a man,a person,entailment", '"   ",a person,neutral']),
            Rejected(400, "invalid_data", ("whitespace-only", "row 2", "column 'premise'")),
        ),
        Case(
            "text-over-the-length-limit",
            "values",
            "data.jsonl",
            jsonl([*good[:2], {**good[2], "hypothesis": "b" * (MAX_TEXT_CHARS + 1)}]),
            Rejected(
                400,
                "invalid_data",
                ("2,001 characters, over the limit of 2,000", "row 3", "column 'hypothesis'"),
            ),
        ),
        Case(
            "no-row-with-a-gold-label",
            "values",
            "data.jsonl",
            jsonl([{**r, "label": "-"} for r in good]),
            Rejected(400, "invalid_data", ("no rows with a gold label", "5 rows without one")),
        ),
        # -- format ----------------------------------------------------------------------------
        Case(
            "binary-named-jsonl",
            "format",
            "data.jsonl",
            b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 8,
            Rejected(400, "invalid_data", ("not a text file", "NUL byte")),
        ),
        Case(
            "truncated-parquet",
            "format",
            "data.parquet",
            parquet(rows(200))[:700],
            Rejected(400, "invalid_data", ("not a readable Parquet file",)),
        ),
        Case(
            "non-utf8-bytes",
            "format",
            "data.csv",
            csv_text(csv_rows(rows(2))) + "un café au lait,a drink,neutral\n".encode("latin-1"),
            Rejected(
                400, "invalid_data", ("not valid UTF-8", "byte 0xe9 at column 7", "row 3", "line 4")
            ),
        ),
        Case(
            "utf16-file",
            "format",
            "data.csv",
            codecs.BOM_UTF16_LE + "\n".join(csv_rows(rows(2))).encode("utf-16-le"),
            Rejected(400, "invalid_data", ("UTF-16",)),
        ),
        Case(
            "malformed-json-on-one-line-of-many",
            "format",
            "data.jsonl",
            b"".join(
                b'{"premise": "a man", "hypothesis": "a person", "label": 0,\n'
                if i == 116
                else jsonl([records(rows(1, offset=i))[0]])
                for i in range(300)
            ),
            Rejected(400, "invalid_data", ("malformed JSON at column", "row 117")),
        ),
        Case(
            "unquoted-delimiter",
            "format",
            "data.csv",
            csv_text([*csv_rows(rows(2)), "a man, a woman and a dog,people,neutral"]),
            Rejected(400, "invalid_data", ("4 fields but the header has 3", "row 3")),
        ),
        Case(
            "unsupported-file-type",
            "format",
            "data.xlsx",
            b"PK\x03\x04" + b"\x00" * 64,
            Rejected(415, "unsupported_file_type", ("unsupported file type '.xlsx'",)),
        ),
        # -- size ------------------------------------------------------------------------------
        Case(
            "file-over-the-upload-limit",
            "size",
            "data.jsonl",
            b"x" * (MAX_UPLOAD_BYTES + 1),
            Rejected(413, "payload_too_large", ("over the upload limit of 16,777,216 bytes",)),
        ),
        Case(
            "body-over-the-upload-limit",
            "size",
            "data.jsonl",
            b"x" * (MAX_UPLOAD_BYTES + 256 * 1024),
            Rejected(413, "payload_too_large", ("request body is over the limit",)),
        ),
        Case(
            "one-10-mb-line-jsonl",
            "size",
            "data.jsonl",
            jsonl([{"premise": "a" * TEN_MB, "hypothesis": "b", "label": 0}], newline=""),
            Rejected(
                400,
                "invalid_data",
                ("10,000,000 characters, over the limit of 2,000", "row 1", "column 'premise'"),
            ),
        ),
        Case(
            "one-10-mb-line-csv",
            "size",
            "data.csv",
            csv_text([HEADER, f"a man,{'b' * TEN_MB},neutral"]),
            Rejected(
                400,
                "invalid_data",
                ("10,000,000 characters, over the limit of 2,000", "row 1", "column 'hypothesis'"),
            ),
        ),
    ]
    return cases


FORMULAS = [
    ("=1+1", '=HYPERLINK("http://example.com","click")'),
    ("+SUM(A1:A9)", "-2+3"),
    ("@cmd|' /C calc'!A0", "a woman is running"),
    ("=cmd|' /C notepad'!'A1'", "\t=2*3"),
]


def accepted_cases() -> list[Case]:
    base = rows(9)
    bom = codecs.BOM_UTF8
    quoted = [
        ('a man says "hello",\nthen leaves', 'he said "bye"', 2),
        ("line one\nline two\r\nline three", "a text, with commas", 1),
        ('"quoted at both ends"', '""', 0),
    ]
    quoted_csv = [HEADER] + [f"{csv_quote(p)},{csv_quote(h)},{LABELS[y]}" for p, h, y in quoted]
    # Each formula pair three times, once per label: whatever the models predict, some row of
    # each pair is wrong for both, so every pair is echoed in the report's "both_wrong" cases.
    formulas = [(p, h, y) for p, h in FORMULAS for y in range(3)]
    formula_csv = [HEADER] + [f"{csv_quote(p)},{csv_quote(h)},{LABELS[y]}" for p, h, y in formulas]
    duplicated = [base[0], base[1], base[1], base[1], base[2], base[0]]
    integer = [{"premise": p, "hypothesis": h, "label": y} for p, h, y in base]
    spaced = [
        "entailment",
        " Entailment ",
        "NEUTRAL",
        "neutral  ",
        "Contradiction",
        " contradiction",
    ]
    snli = [
        {"sentence1": p, "sentence2": h, "gold_label": LABELS[y], "pairID": f"{i}e", "genre": "x"}
        for i, (p, h, y) in enumerate(base[:6])
    ]
    snli.insert(3, {"sentence1": "a man", "sentence2": "a person", "gold_label": "-"})
    letters = "abcdefghijklmnopqrstuvwxyz"
    hundred_k = [(letters[i % 26], letters[(i * 7 + 3) % 26], i % 3) for i in range(100_000)]
    return [
        Case(
            "utf8-bom-csv",
            "encoding",
            "data.csv",
            bom + csv_text(csv_rows(base)),
            Accepted(base),
        ),
        Case(
            "utf8-bom-jsonl", "encoding", "data.jsonl", bom + jsonl(records(base)), Accepted(base)
        ),
        Case(
            "crlf-csv",
            "encoding",
            "data.csv",
            csv_text(csv_rows(base), newline="\r\n"),
            Accepted(base),
        ),
        Case(
            "crlf-jsonl",
            "encoding",
            "data.jsonl",
            jsonl(records(base), newline="\r\n"),
            Accepted(base),
        ),
        Case(
            "quoted-fields-with-newlines-and-quotes",
            "csv",
            "data.csv",
            csv_text(quoted_csv, newline="\r\n"),
            Accepted(quoted),
        ),
        Case(
            "cells-that-look-like-formulas",
            "csv",
            "data.csv",
            csv_text(formula_csv),
            Accepted(formulas, as_job=True),
            notes={"echoed": True},
        ),
        Case(
            "extra-columns",
            "values",
            "data.csv",
            csv_text(
                ["id,premise,genre,hypothesis,label,annotator"]
                + [f"{i},{p},fiction,{h},{LABELS[y]},A{i}" for i, (p, h, y) in enumerate(base)]
            ),
            Accepted(base),
        ),
        Case(
            "duplicate-rows",
            "values",
            "data.jsonl",
            jsonl(records(duplicated)),
            Accepted(duplicated),
        ),
        Case(
            "integer-labels",
            "values",
            "data.jsonl",
            jsonl(integer),
            Accepted(base),
        ),
        Case(
            "integer-labels-as-text",
            "values",
            "data.csv",
            csv_text([HEADER] + [f"{p},{h},{y}" for p, h, y in base]),
            Accepted(base),
        ),
        Case(
            "labels-in-other-case-or-with-spaces",
            "values",
            "data.tsv",
            csv_text(
                ["premise\thypothesis\tlabel"]
                + [f"{p}\t{h}\t{spaced[i]}" for i, (p, h, _) in enumerate(base[:6])]
            ),
            Accepted([(p, h, i // 2) for i, (p, h, _) in enumerate(base[:6])]),
        ),
        Case(
            "snli-column-names-and-no-gold-rows",
            "values",
            "data.jsonl",
            jsonl(snli),
            Accepted(base[:6], dropped=1),
        ),
        Case(
            "100k-rows-of-one-character",
            "size",
            "data.jsonl",
            jsonl(records(hundred_k)),
            Accepted(hundred_k, as_job=True),
        ),
    ]


def corpus() -> list[Case]:
    """Every case, rejected first."""
    return rejected_cases() + accepted_cases()
