"""``bench.route_overhead`` runs end to end on the CPU: every timed request answered 200."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.runtime import ModelRuntime
from bench import route_overhead


def test_the_web_stack_is_timed_per_route(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    classify = ModelRuntime.classify
    out = tmp_path / "result.json"
    argv = ["route_overhead", "--model", str(tiny_llama_dir), "--requests", "20"]
    monkeypatch.setattr("sys.argv", [*argv, "--rounds", "2", "--out", str(out)])
    route_overhead.main()
    result = json.loads(out.read_text())
    assert result["benchmark"] == "route_overhead" and result["requests"] == 20
    assert set(result["routes"]) == {"/classify", "/classify/batch"}
    for row in result["routes"].values():
        assert len(row["rounds_us"]) == 2
        assert 0 < row["best_us"] == min(row["rounds_us"]) <= row["median_us"]
    assert ModelRuntime.classify is classify  # the fixed answer was that app's only
