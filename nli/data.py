"""Reading and validating NLI data: local files (training and ``POST /evaluate``) or hub datasets.

Every bad row is a ``DataError`` that names the source, the row and the column; rows without a
gold label (``-1`` / ``-``) are dropped and counted; nothing else is skipped. Text is kept
verbatim: the prompt layer normalises whitespace, so training and serving see the same strings.
Row numbering per format is described in ``nli.data_readers``; hub datasets number rows 1-based.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nli.data_readers import MISSING, READERS, Record, describe_value
from nli.errors import ConfigError, DataError, UnsupportedFileTypeError
from nli.labels import LabelValueError, parse_label

logger = logging.getLogger(__name__)

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
FIELDS = ("premise", "hypothesis", "label")
# Column names recognised without a mapping, in order of preference: the project's own names,
# then the original SNLI/MultiNLI file names.
DEFAULT_COLUMNS: dict[str, tuple[str, ...]] = {
    "premise": ("premise", "sentence1"),
    "hypothesis": ("hypothesis", "sentence2"),
    "label": ("label", "gold_label"),
}
_MAX_NAMES_SHOWN = 20


@dataclass(frozen=True)
class Example:
    """One labelled pair; ``label`` is 0 entailment, 1 neutral, 2 contradiction."""

    premise: str
    hypothesis: str
    label: int


@dataclass
class NLIData:
    """Validated examples, the count of rows dropped for lack of a gold label, and their source."""

    examples: list[Example]
    dropped: int
    source: str


def parse_columns(spec: str | None) -> dict[str, str] | None:
    """Parse ``"premise=s1,hypothesis=s2,label=y"`` into a column mapping.

    Any subset of the three fields may be given; the others are recognised by their default
    names. ``None`` or a blank spec means no mapping. Raises ``ConfigError`` on a bad spec.
    """
    if spec is None or not spec.strip():
        return None
    mapping: dict[str, str] = {}
    for part in spec.split(","):
        field, sep, column = part.partition("=")
        field, column = field.strip().lower(), column.strip()
        if not sep or not field or not column:
            raise ConfigError(
                f"bad column mapping {part.strip()!r}: expected field=column, "
                "e.g. premise=sentence1,hypothesis=sentence2,label=gold_label"
            )
        if field in mapping:
            raise ConfigError(f"bad column mapping: {field!r} is given twice")
        mapping[field] = column
    return _check_mapping(mapping)


def _check_mapping(columns: Mapping[str, str] | None) -> dict[str, str] | None:
    if not columns:
        return None
    unknown = sorted(set(columns) - set(FIELDS))
    if unknown:
        raise ConfigError(
            f"bad column mapping: unknown field(s) {', '.join(unknown)}; "
            f"expected {', '.join(FIELDS)}"
        )
    return dict(columns)


def _resolve_columns(
    available: Sequence[str],
    mapping: Mapping[str, str] | None,
    *,
    source: str,
    row: int | None,
) -> tuple[str, str, str]:
    """Pick the file's premise, hypothesis and label columns: exact name first, then any case."""
    exact = set(available)
    by_lower: dict[str, str] = {}
    for name in available:
        by_lower.setdefault(name.strip().lower(), name)
    chosen: list[str] = []
    missing: list[str] = []
    for field in FIELDS:
        wanted = (mapping[field],) if mapping and field in mapping else DEFAULT_COLUMNS[field]
        found = next((w for w in wanted if w in exact), None)
        if found is None:
            found = next((by_lower[w.lower()] for w in wanted if w.lower() in by_lower), None)
        if found is None:
            missing.append(f"{field} (looked for {' or '.join(repr(w) for w in wanted)})")
        else:
            chosen.append(found)
    if missing:
        shown = ", ".join(repr(n) for n in available[:_MAX_NAMES_SHOWN]) or "none"
        if len(available) > _MAX_NAMES_SHOWN:
            shown += f", ... ({len(available) - _MAX_NAMES_SHOWN} more)"
        raise DataError(
            f"missing required column(s): {'; '.join(missing)}; columns present: {shown}",
            source=source,
            row=row,
        )
    if len(set(chosen)) < len(chosen):
        raise DataError(
            "the column mapping uses one column for two fields: "
            f"{dict(zip(FIELDS, chosen, strict=True))}",
            source=source,
        )
    return chosen[0], chosen[1], chosen[2]


def _check_text(
    value: object, *, source: str, row: int, column: str, max_text_chars: int | None
) -> str:
    if value is MISSING:
        raise DataError("missing field", source=source, row=row, column=column)
    if value is None:
        raise DataError("null value where text is expected", source=source, row=row, column=column)
    if not isinstance(value, str):
        raise DataError(
            f"expected text, got {describe_value(value)}", source=source, row=row, column=column
        )
    if max_text_chars is not None and len(value) > max_text_chars:
        raise DataError(
            f"text is {len(value):,} characters, over the limit of {max_text_chars:,}",
            source=source,
            row=row,
            column=column,
        )
    if not value.strip():
        raise DataError("empty or whitespace-only text", source=source, row=row, column=column)
    return value


def _check_label(value: object, *, source: str, row: int, column: str) -> int | None:
    if value is MISSING:
        raise DataError("missing field", source=source, row=row, column=column)
    if value is None:
        raise DataError("null label", source=source, row=row, column=column)
    try:
        return parse_label(value)
    except LabelValueError as exc:
        raise DataError(str(exc), source=source, row=row, column=column) from None


def _check_limit(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"{name} must be a positive integer or None, got {value!r}")


def _collect(
    records: Iterator[Record],
    columns: list[str],
    *,
    source: str,
    max_text_chars: int | None,
    max_rows: int | None,
) -> NLIData:
    """Validate streamed records; ``columns`` is filled in by the reader's resolve callback."""
    examples: list[Example] = []
    dropped = 0
    count = 0
    for row, (premise, hypothesis, label) in records:
        count += 1
        if max_rows is not None and count > max_rows:
            raise DataError(
                f"too many rows: more than the limit of {max_rows:,}", source=source, row=row
            )
        label_id = _check_label(label, source=source, row=row, column=columns[2])
        if label_id is None:
            # Rows without a gold label never reach the model, so their text is not checked.
            dropped += 1
            continue
        examples.append(
            Example(
                premise=_check_text(
                    premise,
                    source=source,
                    row=row,
                    column=columns[0],
                    max_text_chars=max_text_chars,
                ),
                hypothesis=_check_text(
                    hypothesis,
                    source=source,
                    row=row,
                    column=columns[1],
                    max_text_chars=max_text_chars,
                ),
                label=label_id,
            )
        )
    if count == 0:
        raise DataError("no rows: the data has no records", source=source)
    if not examples:
        raise DataError(
            f"no rows with a gold label ({dropped:,} rows without one were dropped)", source=source
        )
    logger.info("read %s: %d examples, %d dropped (no gold label)", source, len(examples), dropped)
    return NLIData(examples=examples, dropped=dropped, source=source)


def _file_suffix(path: Path, display_name: str | None) -> str:
    # An upload may be spooled to a temporary file without a suffix; the client's file name
    # then says what it is.
    suffix = path.suffix or (Path(display_name).suffix if display_name else "")
    return suffix.lower()


def read_nli_file(
    path: str | Path,
    *,
    columns: Mapping[str, str] | None = None,
    max_text_chars: int | None = None,
    max_rows: int | None = None,
    display_name: str | None = None,
) -> NLIData:
    """Read and validate a ``.jsonl``, ``.json``, ``.csv``, ``.tsv`` or ``.parquet`` NLI file.

    ``columns`` maps any of premise/hypothesis/label to the file's column names; otherwise
    ``premise``/``hypothesis``/``label`` or ``sentence1``/``sentence2``/``gold_label`` are
    recognised (any case). ``display_name`` names the source in errors (default: the file name).
    Raises ``UnsupportedFileTypeError`` for another suffix and ``DataError`` for bad contents.
    """
    path = Path(path)
    source = display_name or path.name
    suffix = _file_suffix(path, display_name)
    if suffix not in SUPPORTED_SUFFIXES:
        raise UnsupportedFileTypeError(
            f"{source}: unsupported file type {suffix or '(no suffix)'!r}; "
            f"expected one of {', '.join(SUPPORTED_SUFFIXES)}",
            details={"source": source, "suffix": suffix, "supported": list(SUPPORTED_SUFFIXES)},
        )
    mapping = _check_mapping(columns)
    _check_limit("max_text_chars", max_text_chars)
    _check_limit("max_rows", max_rows)
    if not path.is_file():
        raise DataError("file not found", source=source)
    resolved: list[str] = []

    def resolve(available: Sequence[str], row: int | None) -> Sequence[str]:
        resolved[:] = _resolve_columns(available, mapping, source=source, row=row)
        return resolved

    records = READERS[suffix](path, source, resolve)
    return _collect(
        records, resolved, source=source, max_text_chars=max_text_chars, max_rows=max_rows
    )


def _looks_like_path(source: str) -> bool:
    return Path(source).suffix.lower() in SUPPORTED_SUFFIXES or source.startswith(
        (".", "/", "~", "\\")
    )


def load_nli_data(
    source: str,
    *,
    split: str | None = None,
    columns: Mapping[str, str] | None = None,
    max_text_chars: int | None = None,
    max_rows: int | None = None,
) -> NLIData:
    """Load NLI data from a local file, or else a Hugging Face hub dataset id.

    A hub dataset (e.g. ``stanfordnlp/snli``) is loaded with ``datasets.load_dataset(source,
    split=split or "test")``; integer labels follow HF SNLI (0 entailment, 1 neutral,
    2 contradiction, -1 no gold label), and a ``ClassLabel`` feature's own names are honoured.
    """
    path = Path(source).expanduser()
    if path.exists() or _looks_like_path(source):
        if split is not None:
            logger.debug("split %r ignored for local file %s", split, source)
        return read_nli_file(
            path,
            columns=columns,
            max_text_chars=max_text_chars,
            max_rows=max_rows,
            display_name=source,
        )
    mapping = _check_mapping(columns)
    _check_limit("max_text_chars", max_text_chars)
    _check_limit("max_rows", max_rows)
    split = split or "test"
    name = f"{source}[{split}]"
    import datasets  # heavy import; only hub loads need it

    try:
        dataset = datasets.load_dataset(source, split=split)
    except Exception as exc:  # any failure of the hub/cache is a data error here
        raise DataError(f"could not load dataset {source!r} split {split!r}: {exc}") from exc
    if not isinstance(dataset, datasets.Dataset):
        raise DataError(
            f"expected one split of a dataset, got {type(dataset).__name__}", source=name
        )
    resolved = list(_resolve_columns(dataset.column_names, mapping, source=name, row=None))
    return _collect(
        _dataset_records(dataset, resolved),
        resolved,
        source=name,
        max_text_chars=max_text_chars,
        max_rows=max_rows,
    )


def _dataset_records(dataset: Any, columns: Sequence[str]) -> Iterator[Record]:
    # A ClassLabel feature carries the label names in its own id order; map ids through them
    # so a dataset ordered differently from HF SNLI is still read right. -1 stays "no gold".
    names = getattr(dataset.features.get(columns[2]), "names", None)
    row = 0
    for batch in dataset.select_columns(list(columns)).iter(batch_size=1024):
        for premise, hypothesis, label in zip(
            batch[columns[0]], batch[columns[1]], batch[columns[2]], strict=True
        ):
            row += 1
            if names and isinstance(label, int) and 0 <= label < len(names):
                label = names[label]
            yield row, (premise, hypothesis, label)
