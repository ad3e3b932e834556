"""The shipped SNLI adapter loads on CPU and keeps its accuracy on held-out dev rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nli.classifier import NLIClassifier
from nli.data import read_nli_file
from nli.loading import LoadedBase
from nli.manifest import adapter_size_bytes, read_manifest
from tests.conftest import REPO

SHIPPED = REPO / "adapters" / "snli-smollm2"
# Dev rows 0-1,999 are the selection rows: never trained on (training used dev rows 2,000+).
SLICE = slice(0, 300)


def test_shipped_adapter_is_small_and_licensed() -> None:
    assert adapter_size_bytes(SHIPPED) <= 12 * 1024 * 1024
    manifest = read_manifest(SHIPPED)
    assert manifest.base_model == "smollm2-135m-instruct"
    assert "CC BY-SA 4.0" in manifest.license
    assert "CC BY-SA 4.0" in (SHIPPED / "README.md").read_text()
    for name in ("report.json", "report.md", "confusion_matrix.png"):
        assert (SHIPPED / "test" / name).is_file()


def test_shipped_adapter_accuracy_on_held_out_dev(
    default_base: LoadedBase, shared_data: Path
) -> None:
    examples = read_nli_file(shared_data / "snli" / "dev.jsonl").examples[SLICE]
    classifier = NLIClassifier(default_base, max_batch_size=16)
    classifier.attach_adapter(SHIPPED, name="shipped")
    try:
        probs = classifier.score_pairs([(e.premise, e.hypothesis) for e in examples], "shipped")
    finally:
        classifier.detach_adapter("shipped")
    accuracy = float((probs.argmax(axis=1) == np.array([e.label for e in examples])).mean())
    assert accuracy >= 0.82, f"accuracy {accuracy:.3f} on dev[{SLICE.start}:{SLICE.stop}]"
