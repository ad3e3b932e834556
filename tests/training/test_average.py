"""``nli-train average``: the mean of several adapters' updates, exact or compressed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from nli.classifier import NLIClassifier
from nli.errors import AdapterInvalidError, ConfigError
from nli.loading import LoadedBase, load_base_model
from nli.manifest import PEFT_CONFIG_FILE, WEIGHTS_FILE, read_manifest
from tests.nli.adapters import PAIRS, make_adapter
from training.average import average_adapters
from training.cli import main


@pytest.fixture(scope="module")
def base(tiny_model_dir: Path) -> LoadedBase:
    return load_base_model(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="module")
def members(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("members")
    return [
        make_adapter(tiny_model_dir, root / "a", seed=1, r=4, alpha=8),
        make_adapter(tiny_model_dir, root / "b", seed=2, r=4, alpha=16),
        make_adapter(tiny_model_dir, root / "c", seed=3, r=2, alpha=2, use_rslora=True),
    ]


def updates(folder: Path) -> dict[str, torch.Tensor]:
    """Each layer's update scale * B @ A, as PEFT computes it from the folder's files."""
    config = json.loads((folder / PEFT_CONFIG_FILE).read_text())
    r, alpha = config["r"], config["lora_alpha"]
    scale = alpha / r**0.5 if config.get("use_rslora") else alpha / r
    weights = load_file(folder / WEIGHTS_FILE)
    return {
        key.removesuffix(".lora_A.weight"): scale
        * weights[key.replace("lora_A", "lora_B")].double()
        @ weights[key].double()
        for key in weights
        if key.endswith(".lora_A.weight")
    }


def scores(base: LoadedBase, adapter: Path) -> torch.Tensor:
    classifier = NLIClassifier(base)
    classifier.attach_adapter(adapter, name="x")
    try:
        return torch.from_numpy(classifier.score_pairs(PAIRS, adapter="x"))
    finally:
        classifier.detach_adapter("x")


def test_the_exact_average_is_the_mean_of_the_updates(members: list[Path], tmp_path: Path) -> None:
    summary = average_adapters(members, tmp_path / "mean")
    assert summary["rank"] == 4 + 4 + 2 and summary["exact"]
    mean, parts = updates(tmp_path / "mean"), [updates(m) for m in members]
    assert mean.keys() == parts[0].keys() and len(mean) == summary["layers"] > 0
    for layer, update in mean.items():
        expected = sum(p[layer] for p in parts) / len(parts)
        torch.testing.assert_close(update, expected, rtol=1e-5, atol=1e-7)
    manifest = read_manifest(tmp_path / "mean")
    assert manifest.lora["r"] == 10 and manifest.metrics == {}
    assert manifest.lora["averaged"]["members"] == [str(m) for m in members]


def test_the_average_of_copies_serves_like_the_original(
    base: LoadedBase, members: list[Path], tmp_path: Path
) -> None:
    original = scores(base, members[0])
    for rank in (None, 4):
        out = tmp_path / f"copies-{rank}"
        summary = average_adapters([members[0], members[0]], out, rank=rank)
        assert summary["max_relative_error"] < 1e-6  # two equal updates have rank 4 at most
        # The random tiny model amplifies fp32 rounding of the factors (4e-8 relative) to ~2e-4.
        torch.testing.assert_close(scores(base, out), original, rtol=0, atol=1e-3)
    assert not torch.allclose(scores(base, members[1]), original, atol=1e-2)  # scores can differ


def test_a_compressed_average_is_the_best_low_rank_approximation(
    members: list[Path], tmp_path: Path
) -> None:
    average_adapters(members, tmp_path / "exact")
    summary = average_adapters(members, tmp_path / "r3", rank=3)
    assert summary["rank"] == 3 and not summary["exact"]
    exact, low = updates(tmp_path / "exact"), updates(tmp_path / "r3")
    worst = 0.0
    for layer, update in exact.items():
        assert torch.linalg.matrix_rank(low[layer]) <= 3
        singular = torch.linalg.svdvals(update)
        best = singular[3:].square().sum().sqrt()  # Eckart-Young: the least error at rank 3
        error = torch.linalg.norm(update - low[layer])
        torch.testing.assert_close(error, best, rtol=1e-4, atol=1e-9)
        worst = max(worst, float(error / torch.linalg.norm(update)))
    assert summary["max_relative_error"] == pytest.approx(worst, rel=1e-3)
    weights = load_file(tmp_path / "r3" / WEIGHTS_FILE)
    assert {tuple(t.shape)[t.shape[0] != 3] for t in weights.values()} == {3}
    # A rank at or above the sum of the members' ranks is the exact average.
    assert average_adapters(members, tmp_path / "r99", rank=99)["rank"] == 10


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"target_modules": ["q_proj", "v_proj"]}, "targets other layers"),
        ({"rank_pattern": {"q_proj": 2}}, "per-layer ranks"),
    ],
)
def test_adapters_that_cannot_be_averaged_are_refused(
    tiny_model_dir: Path,
    members: list[Path],
    tmp_path: Path,
    change: dict[str, Any],
    message: str,
) -> None:
    odd = make_adapter(tiny_model_dir, tmp_path / "odd", seed=9, **change)
    with pytest.raises(AdapterInvalidError, match=message):
        average_adapters([members[0], odd], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_other_bases_and_bad_arguments_are_refused(members: list[Path], tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    for path in members[1].iterdir():
        (other / path.name).write_bytes(path.read_bytes())
    manifest = json.loads((other / "nli_manifest.json").read_text())
    manifest["base_model_fingerprint"] = "another-base"
    (other / "nli_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(AdapterInvalidError, match="base_model_fingerprint"):
        average_adapters([members[0], other], tmp_path / "out")
    with pytest.raises(ConfigError, match="at least two"):
        average_adapters([members[0]], tmp_path / "out")
    with pytest.raises(ConfigError, match="positive"):
        average_adapters(members, tmp_path / "out", rank=0)
    (tmp_path / "taken").mkdir()
    with pytest.raises(ConfigError, match="already exists"):
        average_adapters(members, tmp_path / "taken")


def test_the_command_line(
    members: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cli"
    argv = ["average", *map(str, members[:2]), "--output", str(out), "--rank", "4"]
    assert main(argv) == 0
    assert "rank 4" in capsys.readouterr().out and read_manifest(out).lora["r"] == 4
    assert main(argv) == 1  # the folder now exists: a one-line error, not a traceback
    assert "already exists" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0
