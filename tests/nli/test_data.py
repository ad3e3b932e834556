"""Reading and validating NLI files: every accepted form and every rejected one."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nli.data import Example, load_nli_data, parse_columns, read_nli_file
from nli.errors import ConfigError, DataError, UnsupportedFileTypeError

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"

ROWS = [
    {"premise": "A man plays a guitar.", "hypothesis": "A man plays music.", "label": "entailment"},
    {"premise": "A dog runs.", "hypothesis": "The dog is asleep.", "label": "contradiction"},
    {"premise": "Kids at a park.", "hypothesis": "Kids are on a trip.", "label": "neutral"},
]
EXPECTED = [
    Example("A man plays a guitar.", "A man plays music.", 0),
    Example("A dog runs.", "The dog is asleep.", 2),
    Example("Kids at a park.", "Kids are on a trip.", 1),
]


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_delimited(path: Path, rows: list[list[str]], delimiter: str = ",") -> Path:
    with path.open("w", encoding="utf-8", newline="") as fh:
        csv.writer(fh, delimiter=delimiter).writerows(rows)
    return path


def as_table(rows: list[dict[str, Any]]) -> list[list[str]]:
    header = list(rows[0])
    return [header] + [[str(r[k]) for k in header] for r in rows]


def write_parquet(path: Path, columns: dict[str, list[Any]]) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def read_error(path: Path, **kwargs: Any) -> DataError:
    with pytest.raises(DataError) as info:
        read_nli_file(path, **kwargs)
    return info.value


# --- accepted ----------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".tsv", ".parquet"])
def test_every_format_reads_the_same_examples(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"data{suffix}"
    if suffix == ".jsonl":
        write_jsonl(path, ROWS)
    elif suffix == ".json":
        path.write_text(json.dumps(ROWS), encoding="utf-8")
    elif suffix == ".parquet":
        write_parquet(path, {k: [r[k] for r in ROWS] for k in ROWS[0]})
    else:
        write_delimited(path, as_table(ROWS), "\t" if suffix == ".tsv" else ",")
    data = read_nli_file(path)
    assert data.examples == EXPECTED
    assert data.dropped == 0
    assert data.source == path.name


def test_json_file_may_hold_json_lines(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "data.json", ROWS)
    assert read_nli_file(path).examples == EXPECTED


def test_labels_as_words_ints_and_text_ints_no_gold_dropped(tmp_path: Path) -> None:
    labels = [" Entailment ", "NEUTRAL", 2, "0", 1, -1, "-", "-1", "contradiction\n"]
    rows = [
        {"premise": f"p{i}", "hypothesis": f"h{i}", "label": lab} for i, lab in enumerate(labels)
    ]
    data = read_nli_file(write_jsonl(tmp_path / "d.jsonl", rows))
    assert [e.label for e in data.examples] == [0, 1, 2, 0, 1, 2]
    assert data.dropped == 3


def test_snli_column_names_any_case_and_extra_columns_ignored(tmp_path: Path) -> None:
    table = [["pairID", "Sentence1", "SENTENCE2", "gold_label", "annotator_labels"]]
    table += [["id1", "A man sleeps.", "A man is awake.", "contradiction", "['x']"]]
    data = read_nli_file(write_delimited(tmp_path / "snli.csv", table))
    assert data.examples == [Example("A man sleeps.", "A man is awake.", 2)]


def test_column_mapping(tmp_path: Path) -> None:
    rows = [{"s1": r["premise"], "s2": r["hypothesis"], "y": r["label"]} for r in ROWS]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    mapping = parse_columns("premise=s1, hypothesis=s2 ,label=y")
    assert mapping == {"premise": "s1", "hypothesis": "s2", "label": "y"}
    assert read_nli_file(path, columns=mapping).examples == EXPECTED


def test_partial_column_mapping_uses_defaults_for_the_rest(tmp_path: Path) -> None:
    rows = [{"premise": r["premise"], "hypothesis": r["hypothesis"], "y": r["label"]} for r in ROWS]
    data = read_nli_file(write_jsonl(tmp_path / "m.jsonl", rows), columns={"label": "y"})
    assert data.examples == EXPECTED


@pytest.mark.parametrize(
    "spec", ["premise", "premise=", "=s1", "colour=s1", "premise=a,premise=b", "label=y,,"]
)
def test_bad_column_spec_is_a_config_error(spec: str) -> None:
    with pytest.raises(ConfigError):
        parse_columns(spec)


@pytest.mark.parametrize("spec", [None, "", "  "])
def test_no_column_spec_means_none(spec: str | None) -> None:
    assert parse_columns(spec) is None


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_utf8_bom_and_crlf_accepted(tmp_path: Path, suffix: str) -> None:
    if suffix == ".csv":
        body = "premise,hypothesis,label\r\nCafé au lait.,A drink.,entailment\r\n"
    else:
        body = '{"premise": "Café au lait.", "hypothesis": "A drink.", "label": "entailment"}\r\n'
    path = tmp_path / f"bom{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    assert read_nli_file(path).examples == [Example("Café au lait.", "A drink.", 0)]


def test_csv_quoted_newlines_quotes_and_formulas_kept_verbatim(tmp_path: Path) -> None:
    texts = ['He said "hi",\nthen left.', "=SUM(A1)", "+1", "@x", "-2", "  spaced  "]
    table = [["premise", "hypothesis", "label"]] + [[t, t, "neutral"] for t in texts]
    data = read_nli_file(write_delimited(tmp_path / "q.csv", table))
    assert [e.premise for e in data.examples] == texts
    assert [e.hypothesis for e in data.examples] == texts


def test_duplicate_rows_kept_and_blank_jsonl_lines_skipped(tmp_path: Path) -> None:
    line = json.dumps(ROWS[0])
    path = tmp_path / "dup.jsonl"
    path.write_text(f"{line}\n\n   \n{line}\n\n", encoding="utf-8")
    assert read_nli_file(path).examples == [EXPECTED[0], EXPECTED[0]]


def test_uppercase_suffix_and_display_name(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "DATA.JSONL", ROWS)
    assert read_nli_file(path, display_name="upload.jsonl").source == "upload.jsonl"


def test_suffix_taken_from_display_name_when_path_has_none(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "spooled", ROWS)
    assert read_nli_file(path, display_name="mine.jsonl").examples == EXPECTED


def test_hundred_thousand_rows(tmp_path: Path) -> None:
    path = tmp_path / "big.csv"
    rows = [["premise", "hypothesis", "label"]]
    rows += [[f"premise {i}", f"hypothesis {i}", str(i % 3)] for i in range(100_000)]
    write_delimited(path, rows)
    data = read_nli_file(path, max_rows=100_000)
    assert len(data.examples) == 100_000
    assert data.examples[-1] == Example("premise 99999", "hypothesis 99999", 0)


# --- rejected ----------------------------------------------------------------------------------


def bad_rows(tmp_path: Path, bad: dict[str, Any], suffix: str = ".jsonl") -> Path:
    """ROWS with ``bad`` as the third record (line/row 3)."""
    rows: list[Any] = [ROWS[0], ROWS[1], bad]
    if suffix == ".jsonl":
        return write_jsonl(tmp_path / "bad.jsonl", rows)
    return write_parquet(tmp_path / "bad.parquet", {k: [r.get(k) for r in rows] for k in ROWS[0]})


@pytest.mark.parametrize(
    ("override", "column", "message"),
    [
        ({"label": "maybe"}, "label", "unknown label 'maybe'"),
        ({"label": 7}, "label", "unknown label 7"),
        ({"label": None}, "label", "null label"),
        ({"label": ""}, "label", "empty label"),
        ({"premise": None}, "premise", "null value"),
        ({"premise": ""}, "premise", "empty or whitespace-only"),
        ({"hypothesis": " \t\n"}, "hypothesis", "empty or whitespace-only"),
        ({"premise": {"text": "x"}}, "premise", "expected text, got an object"),
        ({"hypothesis": ["a", "b"]}, "hypothesis", "expected text, got a list"),
        ({"premise": 42}, "premise", "expected text, got a number"),
        ({"premise": True}, "premise", "expected text, got a boolean"),
    ],
)
def test_bad_value_names_row_and_column(
    tmp_path: Path, override: dict[str, Any], column: str, message: str
) -> None:
    error = read_error(bad_rows(tmp_path, {**ROWS[2], **override}))
    assert (error.row, error.column, error.source) == (3, column, "bad.jsonl")
    assert message in str(error)
    assert "bad.jsonl, row 3" in str(error)


def test_text_over_max_text_chars(tmp_path: Path) -> None:
    error = read_error(bad_rows(tmp_path, {**ROWS[2], "hypothesis": "x" * 101}), max_text_chars=100)
    assert (error.row, error.column) == (3, "hypothesis")
    assert "101 characters, over the limit of 100" in str(error)


def test_huge_csv_field_fails_on_max_text_chars_not_csv_limits(tmp_path: Path) -> None:
    table = [["premise", "hypothesis", "label"], ["ok", "x" * 10_000_000, "neutral"]]
    error = read_error(write_delimited(tmp_path / "huge.csv", table), max_text_chars=10_000)
    assert (error.row, error.column) == (1, "hypothesis")
    assert "10,000,000 characters" in str(error)


def test_missing_field_in_some_rows(tmp_path: Path) -> None:
    error = read_error(bad_rows(tmp_path, {"premise": "p", "label": "neutral"}))
    assert (error.row, error.column) == (3, "hypothesis")
    assert "missing field" in str(error)


def test_short_csv_row_is_a_missing_field(tmp_path: Path) -> None:
    path = tmp_path / "short.csv"
    path.write_text("premise,hypothesis,label\na,b,neutral\nc,d\n", encoding="utf-8")
    error = read_error(path)
    assert (error.row, error.column) == (2, "label")


def test_csv_row_with_extra_fields(tmp_path: Path) -> None:
    path = tmp_path / "extra.csv"
    path.write_text("premise,hypothesis,label\nA man, a dog,A pet,neutral\n", encoding="utf-8")
    error = read_error(path)
    assert error.row == 1
    assert "4 fields but the header has 3" in str(error)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_missing_required_columns_named_with_columns_present(tmp_path: Path, suffix: str) -> None:
    rows = [{"text": "a", "hyp": "b", "label": "neutral"}]
    path = tmp_path / f"cols{suffix}"
    if suffix == ".jsonl":
        write_jsonl(path, rows)
    elif suffix == ".csv":
        write_delimited(path, as_table(rows))
    else:
        write_parquet(path, {k: [v] for k, v in rows[0].items()})
    message = str(read_error(path))
    assert "missing required column(s): premise" in message
    assert "hypothesis" in message
    assert "columns present: 'text', 'hyp', 'label'" in message


def test_mapped_column_absent(tmp_path: Path) -> None:
    error = read_error(write_jsonl(tmp_path / "m.jsonl", ROWS), columns={"premise": "s1"})
    assert "premise (looked for 's1')" in str(error)


def test_malformed_json_line_named(tmp_path: Path) -> None:
    lines = [json.dumps(r) for r in ROWS] + ['{"premise": "x", "hypothesis": ', json.dumps(ROWS[0])]
    path = tmp_path / "broken.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    error = read_error(path)
    assert error.row == 4
    assert "malformed JSON" in str(error)


def test_jsonl_line_that_is_not_an_object(tmp_path: Path) -> None:
    error = read_error(write_jsonl(tmp_path / "l.jsonl", [ROWS[0], ["a", "b", "neutral"]]))
    assert error.row == 2
    assert "expected a JSON object, got a list" in str(error)


def test_malformed_json_list(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(ROWS, indent=1)[:-5], encoding="utf-8")
    assert "malformed JSON at line" in str(read_error(path))


def test_json_list_item_not_an_object(tmp_path: Path) -> None:
    path = tmp_path / "items.json"
    path.write_text(json.dumps([ROWS[0], "oops"]), encoding="utf-8")
    error = read_error(path)
    assert error.row == 2
    assert "expected a JSON object, got text" in str(error)


def test_non_utf8_jsonl_line_named(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    good = (json.dumps(ROWS[0]) + "\n").encode()
    bad = '{"premise": "Café", "hypothesis": "x", "label": "neutral"}\n'.encode("latin-1")
    path.write_bytes(good + good + bad)
    error = read_error(path)
    assert error.row == 3
    assert "not valid UTF-8 (byte 0xe9" in str(error)


def test_non_utf8_csv_row_and_line_named(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    body = 'premise,hypothesis,label\n"two\nlines",h,neutral\nCafé,h,neutral\n'
    path.write_bytes(body.encode("latin-1"))
    error = read_error(path)
    assert error.row == 2
    assert "line 4" in str(error)
    assert "not valid UTF-8" in str(error)


def test_non_utf8_json_list_names_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.json"
    path.write_bytes(
        json.dumps([ROWS[0], {**ROWS[1], "premise": "Ça"}], indent=1, ensure_ascii=False).encode(
            "latin-1"
        )
    )
    error = read_error(path)
    assert "not valid UTF-8" in str(error)
    assert "on line 8" in str(error)


def test_binary_file_named_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "model.jsonl"
    path.write_bytes(bytes(range(256)) * 64)
    assert "not a text file" in str(read_error(path))


def test_utf16_file(tmp_path: Path) -> None:
    path = tmp_path / "u16.csv"
    path.write_bytes("premise,hypothesis,label\na,b,neutral\n".encode("utf-16"))
    assert "UTF-16" in str(read_error(path))


def test_truncated_parquet(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "full.parquet", {k: [r[k] for r in ROWS] * 50 for k in ROWS[0]})
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    error = read_error(cut)
    assert str(error).startswith("cut.parquet: not a readable Parquet file")


def test_parquet_nested_text_and_null_label(tmp_path: Path) -> None:
    path = tmp_path / "nested.parquet"
    pq.write_table(
        pa.table(
            {
                "premise": [{"text": "a"}, {"text": "b"}],
                "hypothesis": ["h", "h"],
                "label": ["neutral", "neutral"],
            }
        ),
        path,
    )
    error = read_error(path)
    assert (error.row, error.column) == (1, "premise")
    assert "expected text, got an object" in str(error)
    error = read_error(bad_rows(tmp_path, {**ROWS[2], "label": None}, ".parquet"))
    assert (error.row, error.column) == (3, "label")
    assert "null label" in str(error)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".tsv", ".parquet"])
def test_empty_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"empty{suffix}"
    path.write_bytes(b"")
    assert "empty file" in str(read_error(path))


@pytest.mark.parametrize("body", ["premise,hypothesis,label\n", "premise,hypothesis,label\n\n,,\n"])
def test_header_only_is_no_rows(tmp_path: Path, body: str) -> None:
    path = tmp_path / "header.csv"
    path.write_text(body, encoding="utf-8")
    assert "no rows" in str(read_error(path))


def test_blank_jsonl_is_no_rows(tmp_path: Path) -> None:
    path = tmp_path / "blank.jsonl"
    path.write_text("\n\n  \n", encoding="utf-8")
    assert "no rows" in str(read_error(path))


def test_only_rows_without_gold_label(tmp_path: Path) -> None:
    rows = [{**r, "label": "-"} for r in ROWS]
    assert "no rows with a gold label (3 rows" in str(
        read_error(write_jsonl(tmp_path / "d.jsonl", rows))
    )


def test_max_rows(tmp_path: Path) -> None:
    error = read_error(write_jsonl(tmp_path / "many.jsonl", ROWS), max_rows=2)
    assert error.row == 3
    assert "more than the limit of 2" in str(error)


def test_unterminated_csv_quote(tmp_path: Path) -> None:
    path = tmp_path / "quote.csv"
    path.write_text('premise,hypothesis,label\na,b,neutral\n"open,b,neutral\nc,d,neutral\n')
    error = read_error(path)
    assert error.row == 2
    assert "malformed CSV" in str(error)


def test_unsupported_suffix(tmp_path: Path) -> None:
    path = tmp_path / "data.xlsx"
    path.write_bytes(b"PK")
    with pytest.raises(UnsupportedFileTypeError, match=r"'\.xlsx'"):
        read_nli_file(path)


def test_file_not_found(tmp_path: Path) -> None:
    assert "file not found" in str(read_error(tmp_path / "nope.jsonl"))


def test_bad_limits_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        read_nli_file(write_jsonl(tmp_path / "d.jsonl", ROWS), max_rows=0)


# --- load_nli_data -----------------------------------------------------------------------------


def test_load_local_path(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    data = load_nli_data(str(path))
    assert data.examples == EXPECTED
    assert data.source == str(path)


def test_load_missing_local_path_does_not_go_to_the_hub(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets

    def fail(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("hub must not be called for a local path")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(DataError, match="file not found"):
        load_nli_data(str(tmp_path / "missing.jsonl"))


def test_load_hub_dataset_without_network(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    features = datasets.Features(
        {
            "premise": datasets.Value("string"),
            "hypothesis": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["entailment", "neutral", "contradiction"]),
        }
    )
    table = {
        "premise": ["A man plays.", "A man plays.", "A dog runs.", "A cat."],
        "hypothesis": ["Music.", "Silence.", "A dog sleeps.", "An animal."],
        "label": [0, -1, 2, 1],
    }
    calls: list[tuple[str, str | None]] = []

    def fake_load(path: str, split: str | None = None, **kwargs: Any) -> datasets.Dataset:
        calls.append((path, split))
        return datasets.Dataset.from_dict(table, features=features)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    data = load_nli_data("stanfordnlp/snli")
    assert calls == [("stanfordnlp/snli", "test")]
    assert [e.label for e in data.examples] == [0, 2, 1]
    assert data.examples[0] == Example("A man plays.", "Music.", 0)
    assert data.dropped == 1
    assert "stanfordnlp/snli" in data.source
    load_nli_data("stanfordnlp/snli", split="validation")
    assert calls[-1] == ("stanfordnlp/snli", "validation")


def test_hub_class_label_order_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    features = datasets.Features(
        {
            "premise": datasets.Value("string"),
            "hypothesis": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["contradiction", "entailment", "neutral"]),
        }
    )
    table = {"premise": ["p", "p"], "hypothesis": ["h", "h"], "label": [0, 1]}
    monkeypatch.setattr(
        datasets,
        "load_dataset",
        lambda *a, **k: datasets.Dataset.from_dict(table, features=features),
    )
    assert [e.label for e in load_nli_data("someone/nli").examples] == [2, 0]


def test_hub_failure_is_a_data_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def offline(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="could not load dataset 'someone/nli'"):
        load_nli_data("someone/nli")


# --- the real SNLI files ------------------------------------------------------------------------


def test_real_snli_dev() -> None:
    path = SHARED_DATA / "snli" / "dev.jsonl"
    if not path.is_file():
        pytest.skip(f"shared data not present at {SHARED_DATA}")
    data = read_nli_file(path)
    assert len(data.examples) == 9_842
    assert data.dropped == 0
    assert Counter(e.label for e in data.examples) == {0: 3_329, 1: 3_235, 2: 3_278}
