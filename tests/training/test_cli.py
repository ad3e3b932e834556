"""``nli-train`` from the command line: clean one-line errors, the bare-base evaluation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from training.cli import main

from .conftest import RecipeWriter, synthetic_rows, write_jsonl


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 1
    lines = [line for line in err.splitlines() if line.startswith("nli-train: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_bad_training_rows_name_file_row_and_problem(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_recipe: RecipeWriter
) -> None:
    rows = synthetic_rows(8, seed=5)
    rows[2]["label"] = "maybe"
    bad = write_jsonl(tmp_path / "bad_train.jsonl", rows)
    recipe = tiny_recipe(tmp_path, data={"train_file": str(bad)})
    code, _, err = run_cli(capsys, "train", "--recipe", str(recipe))
    assert_one_line_error(code, err, "bad_train.jsonl", "row 3", "unknown label 'maybe'")
    assert not (tmp_path / "adapter").exists()


def test_missing_text_and_missing_columns(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_recipe: RecipeWriter
) -> None:
    rows = synthetic_rows(4, seed=6)
    rows[1]["premise"] = "   "
    bad = write_jsonl(tmp_path / "blank.jsonl", rows)
    recipe = tiny_recipe(tmp_path / "a", data={"dev_file": str(bad)})
    code, _, err = run_cli(capsys, "train", "--recipe", str(recipe))
    assert_one_line_error(code, err, "blank.jsonl", "row 2", "'premise'", "empty")
    renamed = write_jsonl(tmp_path / "renamed.jsonl", [{"s1": "a", "s2": "b", "y": "neutral"}] * 3)
    recipe = tiny_recipe(tmp_path / "b", data={"train_file": str(renamed)})
    code, _, err = run_cli(capsys, "train", "--recipe", str(recipe))
    assert_one_line_error(code, err, "renamed.jsonl", "missing required column")


def test_column_mapping_from_the_command_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_llama_dir: Path
) -> None:
    rows = [
        {"s1": r["premise"], "s2": r["hypothesis"], "y": r["label"]}
        for r in synthetic_rows(12, seed=7)
    ]
    data = write_jsonl(tmp_path / "mapped.jsonl", rows + [{"s1": "a", "s2": "b", "y": "-"}])
    code, out, err = run_cli(
        capsys,
        "evaluate",
        "--data",
        str(data),
        "--columns",
        "premise=s1,hypothesis=s2,label=y",
        "--base-model",
        str(tiny_llama_dir),
        "--device",
        "cpu",
        "--no-progress",
        "--json",
    )
    assert code == 0, err
    report = json.loads(out)
    assert (report["n"], report["dropped"], report["adapter"]) == (12, 1, "base")
    assert report["base"] is None and report["cases"] is None
    assert 0 <= report["metrics"]["accuracy"] <= 1


def test_evaluate_compile_reaches_the_classifier(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    tiny_llama_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import training.evaluate

    seen: list[dict[str, Any]] = []
    real = training.evaluate.NLIClassifier

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(training.evaluate, "NLIClassifier", spy)
    data = write_jsonl(tmp_path / "d.jsonl", synthetic_rows(6, seed=3))
    common = ["evaluate", "--data", str(data), "--base-model", str(tiny_llama_dir)]
    code, out, err = run_cli(capsys, *common, "--device", "cpu", "--no-progress", "--compile")
    assert code == 0, err
    assert seen[-1]["compile"] is True  # on the CPU the classifier then ignores it
    assert "6 pairs" in out
    code, _, err = run_cli(capsys, *common, "--device", "cpu", "--no-progress")
    assert code == 0, err
    assert seen[-1]["compile"] is False
    # the batch size: the CPU's default unless given
    assert (seen[-1]["max_batch_size"], seen[-1]["max_tokens_per_batch"]) == (64, 64 * 128)
    code, _, err = run_cli(capsys, *common, "--device", "cpu", "--no-progress", "--batch-size", "4")
    assert code == 0, err
    assert seen[-1]["max_batch_size"] == 4
    code, _, err = run_cli(capsys, *common, "--device", "cpu", "--no-progress", "--batch-size", "0")
    assert code != 0 and "must be positive" in err  # 0 is refused, not taken for the default


def test_evaluation_batches_are_larger_on_a_gpu() -> None:
    from training.evaluate import default_batch_size

    assert default_batch_size(torch.device("cuda", 1)) == 1024
    assert default_batch_size(torch.device("cpu")) == 64
    assert default_batch_size(torch.device("mps")) == 64


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["train", "--recipe", "no-such-recipe"], ["unknown recipe 'no-such-recipe'"]),
        (
            ["train", "--recipe", "smollm2-135m-snli", "--set", "train.lr=1"],
            ["unknown key train.lr"],
        ),
        (["evaluate", "--data", "/nonexistent/x.jsonl"], ["x.jsonl", "file not found"]),
        (["evaluate", "--data", "notes.txt"], ["unsupported file type '.txt'"]),
        (["evaluate", "--data", "d.jsonl", "--columns", "premise"], ["bad column mapping"]),
        (["evaluate", "--data", "d.jsonl", "--adapter", "/nonexistent"], ["no nli_manifest"]),
    ],
)
def test_usage_errors_are_one_line(
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    fragments: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("premise,hypothesis,label\n")
    code, _, err = run_cli(capsys, *args)
    assert_one_line_error(code, err, *fragments)


def test_recipes_command(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "recipes")
    assert code == 0
    assert out.splitlines()[0].startswith("qwen2.5-1.5b-snli: ")
    assert out.splitlines()[1].startswith("smollm2-135m-snli: ")


def test_console_script_exit_status(tmp_path: Path) -> None:
    # The real process: an NLIError exits 1 with one line and no traceback.
    result = subprocess.run(
        [sys.executable, "-m", "training.cli", "evaluate", "--data", str(tmp_path / "x.csv")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("nli-train: error: ")
