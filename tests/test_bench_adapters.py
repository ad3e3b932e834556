"""``bench.classify_latency.make_adapters``: random adapters from the base's shapes alone."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

from bench.classify_latency import (
    adapter_seeds,
    build_parser,
    ensure_adapters,
    make_adapters,
    prepare_adapters,
)
from nli.classifier import NLIClassifier
from nli.loading import load_base_model
from nli.manifest import MANIFEST_FILE, WEIGHTS_FILE, read_manifest


def test_adapters_made_without_weights_are_those_peft_makes_on_the_loaded_model(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    made = make_adapters(
        str(tiny_llama_dir), tmp_path, {"a": 3}, rank=4, alpha=8, dtype="fp32", quantization="nf4"
    )
    assert set(made) == {"imports_s", "setup_s", "adapters_s"}

    # The same seed and LoRA settings on the loaded model, as the script did before.
    base = load_base_model(str(tiny_llama_dir), quantization="none", device="cpu")
    torch.manual_seed(3)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    reference = get_peft_model(base.model, config)
    reference.save_pretrained(str(tmp_path / "reference"))
    expected = load_file(str(tmp_path / "reference" / WEIGHTS_FILE))
    saved = load_file(str(tmp_path / "a" / WEIGHTS_FILE))
    assert saved.keys() == expected.keys()
    for key, tensor in expected.items():
        assert saved[key].dtype == torch.float32
        torch.testing.assert_close(saved[key], tensor, rtol=0, atol=0)

    manifest = read_manifest(tmp_path / "a")
    assert manifest.base_model_fingerprint == base.ref.fingerprint
    assert manifest.quantization == "nf4"
    # A server's classifier accepts it and scores with it.
    nf4 = load_base_model(str(tiny_llama_dir), device="cpu")
    classifier = NLIClassifier(nf4)
    classifier.attach_adapter(tmp_path / "a", name="a")
    scores = classifier.score_pairs([("A man plays.", "Someone plays.")], "a")
    assert scores.shape == (1, 3)


def test_adapters_prepared_ahead_are_found_and_not_made_again(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """``bench/run_gpu.sh``'s prepare step makes what a classify step with the same arguments
    needs; that step then makes nothing."""
    root = tmp_path / "adapters"
    argv = [
        "--model",
        str(tiny_llama_dir),
        "--swaps",
        "3",
        "--rank",
        "4",
        "--adapters-dir",
        str(root),
    ]
    assert prepare_adapters(*argv) == root
    names = {"bench-a", "bench-b", "swap-0", "swap-1", "swap-2"}
    assert {p.name for p in root.iterdir()} == names == set(adapter_seeds(3))
    args = build_parser().parse_args(argv)
    assert ensure_adapters(args, str(tiny_llama_dir), root) == {}  # all there: nothing made
    (root / "swap-2" / MANIFEST_FILE).unlink()  # as if cut short before its manifest
    assert set(ensure_adapters(args, str(tiny_llama_dir), root)) == {
        "imports_s",
        "setup_s",
        "adapters_s",
    }
    assert read_manifest(root / "swap-2").lora["r"] == 4
    assert set(adapter_seeds(1)) == {"bench-a", "bench-b", "swap-0", "swap-1"}  # swaps need two
