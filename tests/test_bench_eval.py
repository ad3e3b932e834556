"""``bench.eval_profile`` and ``bench.eval_throughput`` run end to end on the CPU (their
CUDA-only parts are skipped there)."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest

from app.gc_pauses import CollectionTimer
from bench import eval_profile, eval_throughput

PAIRS = [
    ("a man is playing guitar in the park", "a man plays music", "entailment"),
    ("two dogs are running on the beach", "the dogs are not outside", "contradiction"),
    ("the child is sitting", "a child is sitting on a chair", "neutral"),
]


def write_pairs(folder: Path) -> Path:
    """Nine labelled pairs as a JSON-lines file."""
    data = folder / "pairs.jsonl"
    rows = [{"premise": p, "hypothesis": h, "label": label} for p, h, label in PAIRS * 3]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return data


def test_a_pass_is_split_into_its_parts(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = write_pairs(tmp_path)
    out = tmp_path / "result.json"
    argv = ["eval_profile", "--model", str(tiny_llama_dir), "--device", "cpu", "--data", str(data)]
    monkeypatch.setattr(
        "sys.argv", [*argv, "--config", "prefix", "--repeats", "1", "--out", str(out)]
    )
    eval_profile.main()
    result = json.loads(out.read_text())
    assert (result["benchmark"], result["config"], result["card"]) == (
        "eval_profile",
        "prefix",
        "cpu",
    )
    assert result["pairs"] == 9 and result["tokens"] > 9 * 10
    for key in ("encode_s", "launch_s", "device_s", "full_s"):
        assert result[key] > 0, key
    assert "kernel_s" not in result  # measured on CUDA only
    assert result["pairs_per_s"] == round(9 / result["full_s"])


def test_throughput_gives_best_and_median_passes_and_their_collections(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "result.json"
    argv = ["eval_throughput", "--model", str(tiny_llama_dir), "--device", "cpu"]
    argv += ["--data", str(write_pairs(tmp_path)), "--batch-sizes", "4", "--repeats", "3"]
    monkeypatch.setattr("sys.argv", [*argv, "--configs", "prefix", "--out", str(out)])
    eval_throughput.main()
    result = json.loads(out.read_text())
    (row,) = result["results"]
    timed = sorted(row["passes_s"][1:])
    assert len(timed) == 3 and len(row["gc_full"]) == len(row["gc_s"]) == 4
    # Rounded pass times: rates within rounding of 9 pairs over the best and the median pass.
    assert row["pairs_per_s"] == pytest.approx(9 / timed[0], rel=0.05)
    assert row["median_pairs_per_s"] == pytest.approx(9 / timed[1], rel=0.05)
    assert row["pairs_per_s"] >= row["median_pairs_per_s"]
    assert all(n >= 0 for n in row["gc_full"]) and all(s >= 0 for s in row["gc_s"])
    # Every pass tokenises and scores on this CPU, so each one used CPU time.
    assert len(row["cpu_s"]) == 4 and all(s > 0 for s in row["cpu_s"])
    assert "num_device_alloc" not in row  # the CUDA allocator's counts: on CUDA only


def test_a_pass_counts_full_collections_only_inside_its_block() -> None:
    watch = eval_throughput.PassCollections()
    with CollectionTimer(watch) as timer:
        gc.collect(0)
        gc.collect(1)
        assert watch.full == 0
        gc.collect()
        gc.collect(2)
    assert watch.full == 2
    assert watch.seconds > 0
    assert timer not in gc.callbacks
    gc.collect()  # after the block: not counted
    assert watch.full == 2


def test_merge_accuracy_compares_peft_and_the_merged_copy(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bench import merge_accuracy
    from tests.nli.adapters import make_adapter

    adapter = make_adapter(tiny_llama_dir, tmp_path / "adapter", seed=3)
    out = tmp_path / "result.json"
    argv = ["merge_accuracy", "--base-model", str(tiny_llama_dir), "--adapter", str(adapter)]
    argv += ["--data", str(write_pairs(tmp_path)), "--rows", "6", "--out", str(out)]
    monkeypatch.setattr("sys.argv", argv)
    merge_accuracy.main()
    result = json.loads(out.read_text())
    assert result["rows"] == 6 and 0 <= result["same_label"] <= 6
    # Merged bf16 weights round once more than PEFT's layers: close, but not the same numbers.
    assert 0 < result["max_prob_gap"] < 0.05
    assert set(result["seconds"]) == {"peft", "merged"}
