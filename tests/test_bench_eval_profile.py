"""``bench.eval_profile`` runs end to end on the CPU (its CUDA-only parts are skipped there)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import eval_profile

PAIRS = [
    ("a man is playing guitar in the park", "a man plays music", "entailment"),
    ("two dogs are running on the beach", "the dogs are not outside", "contradiction"),
    ("the child is sitting", "a child is sitting on a chair", "neutral"),
]


def test_a_pass_is_split_into_its_parts(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "pairs.jsonl"
    rows = [{"premise": p, "hypothesis": h, "label": label} for p, h, label in PAIRS * 3]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
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
