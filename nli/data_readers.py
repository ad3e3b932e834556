"""Format-specific record readers behind ``nli.data``: JSON lines, JSON, CSV/TSV and Parquet.

Every reader streams ``(row, (premise, hypothesis, label))`` records, with raw cell values as the
format gives them (``MISSING`` where a row lacks the field); ``nli.data`` validates them. A reader
learns the file's column names first (header, schema or first object), hands them to the
``resolve`` callback, which picks the three columns or raises ``DataError``, and then reads only
those columns.

Row numbers are 1-based. JSON lines (``.jsonl``, and ``.json`` that is not a list): the physical
line number, blank lines included, so an editor's "go to line" finds it. CSV/TSV, a ``.json``
list and Parquet: the data record number, header not counted (a quoted CSV field can span lines,
so the line number would mislead; CSV errors raised here also name the line).
"""

from __future__ import annotations

import codecs
import csv
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Final

from nli.errors import DataError

# Marks a field that a row does not have at all, as opposed to an explicit null.
MISSING: Final = object()

Values = tuple[object, object, object]
Record = tuple[int, Values]
# (column names the file has, row of the first record or None for a header) -> the three names.
Resolver = Callable[[Sequence[str], int | None], Sequence[str]]
Reader = Callable[[Path, str, Resolver], Iterator[Record]]

_HEAD_BYTES = 8192
# The csv module refuses fields over 128 KiB by default with a bare csv.Error; raise the limit so
# an over-long text reaches the max_text_chars check and gets a clear message. Uploads are capped
# by size before they get here, so this does not open a memory hole. 2**31 - 1 fits a C long on
# every platform (sys.maxsize overflows on Windows).
_CSV_FIELD_LIMIT = 2**31 - 1


class _BadBytes(Exception):
    """A line that is not UTF-8 text; the reader that knows the row turns it into DataError."""

    def __init__(self, line: int, reason: str) -> None:
        super().__init__(reason)
        self.line = line
        self.reason = reason


def check_text_head(head: bytes, source: str) -> None:
    """Reject empty, UTF-16 and binary files up front, before any line is parsed."""
    if not head:
        raise DataError("empty file", source=source)
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise DataError("file is UTF-16 encoded; save it as UTF-8", source=source)
    nul = head.find(b"\x00")
    if nul >= 0:
        raise DataError(
            f"not a text file (binary data: NUL byte at offset {nul}); expected UTF-8 text",
            source=source,
        )


def _decode_lines(raw_lines: Iterable[bytes]) -> Iterator[str]:
    """Decode line by line so a bad byte is reported with its line number.

    Splitting bytes on ``\\n`` is safe for UTF-8: no multi-byte sequence contains 0x0A.
    """
    for number, raw in enumerate(raw_lines, start=1):
        if number == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8) :]
        if b"\x00" in raw:
            raise _BadBytes(number, "binary data (NUL byte), not UTF-8 text")
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _BadBytes(
                number,
                f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
                "save the file as UTF-8",
            ) from None


def _json_line_records(
    lines: Iterable[str], source: str, resolve: Resolver, *, hint: str = ""
) -> Iterator[Record]:
    selected: Sequence[str] | None = None
    number = 0
    try:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"malformed JSON at column {exc.colno}: {exc.msg}{hint}",
                    source=source,
                    row=number,
                ) from exc
            if not isinstance(obj, dict):
                raise DataError(
                    f"expected a JSON object, got {describe_value(obj)}{hint}",
                    source=source,
                    row=number,
                )
            if selected is None:
                selected = resolve(list(obj), number)
            yield (
                number,
                (
                    obj.get(selected[0], MISSING),
                    obj.get(selected[1], MISSING),
                    obj.get(selected[2], MISSING),
                ),
            )
    except _BadBytes as exc:
        raise DataError(exc.reason, source=source, row=exc.line) from None


def read_jsonl(path: Path, source: str, resolve: Resolver) -> Iterator[Record]:
    """Stream records from a JSON lines file; blank lines are skipped."""
    with path.open("rb") as fh:
        check_text_head(fh.read(_HEAD_BYTES), source)
        fh.seek(0)
        yield from _json_line_records(_decode_lines(fh), source, resolve)


def read_json(path: Path, source: str, resolve: Resolver) -> Iterator[Record]:
    """Records from a ``.json`` file: a list of objects, or else JSON lines."""
    raw = path.read_bytes()
    check_text_head(raw[:_HEAD_BYTES], source)
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8) :]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(
            f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} on line {line}); save the file as UTF-8",
            source=source,
        ) from None
    del raw
    if not text.lstrip().startswith("["):
        # Split on "\n" only: str.splitlines() would also split on U+2028, which JSON strings
        # may contain unescaped.
        hint = " (a .json file must hold a list of objects, or one object per line)"
        yield from _json_line_records(text.split("\n"), source, resolve, hint=hint)
        return
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}", source=source
        ) from exc
    del text
    selected: Sequence[str] | None = None
    for row, obj in enumerate(items, start=1):
        if not isinstance(obj, dict):
            raise DataError(
                f"expected a JSON object, got {describe_value(obj)}", source=source, row=row
            )
        if selected is None:
            selected = resolve(list(obj), row)
        yield (
            row,
            (
                obj.get(selected[0], MISSING),
                obj.get(selected[1], MISSING),
                obj.get(selected[2], MISSING),
            ),
        )


def _read_delimited(path: Path, source: str, resolve: Resolver, delimiter: str) -> Iterator[Record]:
    # RFC 4180 quoting (as written by spreadsheets, pandas and the csv module) for both CSV and
    # TSV. strict=True turns a stray quote or an unterminated quoted field into an error instead
    # of silently merging the rest of the file into one cell.
    if csv.field_size_limit() < _CSV_FIELD_LIMIT:
        csv.field_size_limit(_CSV_FIELD_LIMIT)
    with path.open("rb") as fh:
        check_text_head(fh.read(_HEAD_BYTES), source)
        fh.seek(0)
        reader = csv.reader(_decode_lines(fh), delimiter=delimiter, strict=True)
        yield from _delimited_records(reader, source, resolve)


def _delimited_records(
    reader: Iterator[list[str]], source: str, resolve: Resolver
) -> Iterator[Record]:
    header: list[str] | None = None
    indices: list[int] = []
    row = 0
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except _BadBytes as exc:
            raise DataError(
                f"line {exc.line}: {exc.reason}", source=source, row=row + 1 if header else None
            ) from None
        except csv.Error as exc:
            line = getattr(reader, "line_num", "?")
            raise DataError(
                f"malformed CSV near line {line}: {exc}",
                source=source,
                row=row + 1 if header else None,
            ) from exc
        # Blank lines, and rows of empty cells that spreadsheets append, carry no data.
        if not any(fields):
            continue
        if header is None:
            header = fields
            indices = _header_indices(header, resolve(header, None), source)
            continue
        row += 1
        if len(fields) > len(header) and any(f.strip() for f in fields[len(header) :]):
            raise DataError(
                f"{len(fields)} fields but the header has {len(header)} "
                f"(an unquoted delimiter inside a text?)",
                source=source,
                row=row,
            )
        yield (
            row,
            (
                fields[indices[0]] if indices[0] < len(fields) else MISSING,
                fields[indices[1]] if indices[1] < len(fields) else MISSING,
                fields[indices[2]] if indices[2] < len(fields) else MISSING,
            ),
        )


def _header_indices(header: list[str], selected: Sequence[str], source: str) -> list[int]:
    indices = []
    for name in selected:
        if header.count(name) > 1:
            raise DataError(
                "column appears more than once in the header", source=source, column=name
            )
        indices.append(header.index(name))
    return indices


def read_csv(path: Path, source: str, resolve: Resolver) -> Iterator[Record]:
    """Stream records from a comma-separated file with a header row."""
    return _read_delimited(path, source, resolve, ",")


def read_tsv(path: Path, source: str, resolve: Resolver) -> Iterator[Record]:
    """Stream records from a tab-separated file with a header row."""
    return _read_delimited(path, source, resolve, "\t")


def read_parquet(path: Path, source: str, resolve: Resolver) -> Iterator[Record]:
    """Stream records from a Parquet file in batches, reading only the three columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.stat().st_size == 0:
        raise DataError("empty file", source=source)
    # pyarrow reports corrupt files as ArrowInvalid (a ValueError), OSError or other
    # ArrowException subclasses; all of them mean "not a readable Parquet file" here.
    arrow_errors = (pa.ArrowException, OSError, ValueError)
    try:
        parquet = pq.ParquetFile(path)
        names = list(parquet.schema_arrow.names)
    except arrow_errors as exc:
        raise DataError(f"not a readable Parquet file: {exc}", source=source) from exc
    selected = list(resolve(names, None))
    batches = parquet.iter_batches(batch_size=8192, columns=selected)
    row = 0
    while True:
        try:
            batch = next(batches)
            # iter_batches returns columns in schema order, not in the order asked for.
            columns = [batch.column(name).to_pylist() for name in selected]
        except StopIteration:
            return
        except arrow_errors as exc:
            raise DataError(f"corrupt Parquet data: {exc}", source=source, row=row + 1) from exc
        for values in zip(*columns, strict=True):
            row += 1
            yield row, (values[0], values[1], values[2])


def describe_value(value: object) -> str:
    """A short, user-facing name for a value's type, in JSON terms."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return f"a number ({value!r})"
    if value is None:
        return "null"
    if isinstance(value, str):
        return "text"
    return type(value).__name__


READERS: dict[str, Reader] = {
    ".jsonl": read_jsonl,
    ".json": read_json,
    ".csv": read_csv,
    ".tsv": read_tsv,
    ".parquet": read_parquet,
}
