"""Soak: 5,000 ``/classify`` requests from 32 clients on loopback while 50 adapter loads,
unloads, replacements and default switches happen, against the real server process.

CI runs it on the tiny model; the same scenario on the offline default model
(SmolLM2-135M-Instruct, NF4 on CPU) is a ``slow`` benchmark. Both write their numbers to
``.cache/bench/`` (ignored by git) for BENCHMARKS.md.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from nli.classifier import NLIClassifier
from nli.default_model import DEFAULT_BASE_MODEL
from tests.app.conftest import PAIRS, Scores
from tests.app.helpers import REPO
from tests.reliability.soak import (
    DELTA_VERSIONS,
    SoakResult,
    SoakServer,
    prepare,
    run_soak,
    write_numbers,
)

REQUESTS = 5000
CLIENTS = 32
ADMIN_OPERATIONS = 50
RSS_FROM = 1000
NAMES = ("base", "alpha", "beta", "gamma", *DELTA_VERSIONS[1:])
BENCH_DIR = REPO / ".cache" / "bench"


def assert_soak(result: SoakResult) -> None:
    statuses = result.statuses()
    assert result.problems == [], "\n".join(result.problems[:50])
    assert not [s for s in statuses if s >= 500], statuses
    assert set(statuses) <= {200, 404}  # 404: gamma asked for while it was unloaded
    assert len(result.answers) == REQUESTS
    assert len(result.operations) == ADMIN_OPERATIONS
    assert result.operations_during_load == ADMIN_OPERATIONS
    growth = result.rss[REQUESTS] / result.rss[RSS_FROM] - 1
    assert growth < 0.05, f"server RSS grew {growth:.1%} from request 1,000 to 5,000"


def distinct(expected: dict[str, np.ndarray], tolerance: float) -> None:
    """Every two adapter versions score every pair more than twice the tolerance apart, so an
    answer within the tolerance of one version cannot be within it of another."""
    names = list(expected)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            gap = np.abs(expected[a] - expected[b]).max(axis=1).min()
            assert gap > 2 * tolerance, (a, b, gap)


def make_head_adapter(base: Any, folder: Path, *, seed: int) -> Path:
    """A random LoRA (``init_lora_weights=False``) on the last layer's ``down_proj`` only.

    On the default model in bf16 (CPU), the same pair scored alone or in a batch differs by up
    to ~0.03 in probability, and a random LoRA on every layer amplifies that to ~0.3: versions
    could not be told apart. One strong update at the end moves the label probabilities far
    (every two versions >= ~0.15 apart on every pair) while the noise stays the base model's.
    """
    from peft import LoraConfig, get_peft_model

    from nli.labels import LABELS
    from nli.manifest import AdapterManifest, write_manifest
    from nli.prompt import CURRENT_PROMPT_FORMAT
    from nli.scoring import label_tokens

    last = base.model.config.num_hidden_layers - 1
    torch.manual_seed(seed)
    config = LoraConfig(
        r=8,
        lora_alpha=8 * 128,
        target_modules=rf"model\.layers\.{last}\.mlp\.down_proj",
        init_lora_weights=False,
    )
    peft_model = get_peft_model(base.model, config)
    peft_model.save_pretrained(folder)
    base.model = peft_model.unload()
    manifest = AdapterManifest(
        base_model=base.ref.name,
        base_model_fingerprint=base.ref.fingerprint,
        quantization=base.quantization,
        prompt_format=CURRENT_PROMPT_FORMAT,
        label_words=list(LABELS),
        label_token_ids=[list(seq) for seq in label_tokens(base.tokenizer).sequences],
        training_data={"source": "random soak adapter", "seed": seed},
    )
    write_manifest(folder, manifest)
    return folder


def test_soak_on_the_tiny_model(
    tmp_path: Path, tiny_llama_dir: Path, adapter_store: Path, reference: Scores
) -> None:
    prepare(adapter_store, tmp_path / "adapters")
    expected = {name: reference(PAIRS, name) for name in NAMES}
    distinct(expected, 1e-4)
    settings: dict[str, Any] = {"base_model": tiny_llama_dir, "cache_dir": tmp_path / "cache"}
    with SoakServer(tmp_path, default_adapter="alpha", **settings) as server:
        result = run_soak(
            server,
            adapter_store,
            expected,
            PAIRS,
            requests=REQUESTS,
            clients=CLIENTS,
            admin_operations=ADMIN_OPERATIONS,
            rss_from=RSS_FROM,
            tolerance=1e-4,
        )
    numbers = write_numbers(
        BENCH_DIR / "soak-tiny.json", result, model="tiny random llama (tests)", omp_threads=1
    )
    print(numbers)
    assert_soak(result)


@pytest.mark.slow
def test_soak_on_the_default_model(tmp_path: Path, default_base: Any) -> None:
    """The same scenario on SmolLM2-135M-Instruct (NF4, CPU): a benchmark, minutes long."""
    store = tmp_path / "store"
    seeds = {"alpha": 1, "beta": 2, "gamma": 3, "alpha-v2": 4}
    for name, seed in seeds.items():
        make_head_adapter(default_base, store / name, seed=seed)
    classifier = NLIClassifier(default_base)
    for name in seeds:
        classifier.attach_adapter(store / name, name=name)
    expected = {
        name: np.stack(
            [classifier.score_pairs([pair], None if name == "base" else name)[0] for pair in PAIRS]
        )
        for name in NAMES
    }
    for name in seeds:
        classifier.detach_adapter(name)
    tolerance = 0.07  # bf16 on CPU: a pair scored in a batch differs from alone by up to ~0.03
    distinct(expected, tolerance)
    prepare(store, tmp_path / "adapters")
    threads = int(os.environ.get("NLI_SOAK_THREADS", "1"))
    with SoakServer(tmp_path, threads=threads, default_adapter="alpha") as server:
        result = run_soak(
            server,
            store,
            expected,
            PAIRS,
            requests=REQUESTS,
            clients=CLIENTS,
            admin_operations=ADMIN_OPERATIONS,
            rss_from=RSS_FROM,
            tolerance=tolerance,
        )
    numbers = write_numbers(
        BENCH_DIR / f"soak-{DEFAULT_BASE_MODEL}.json",
        result,
        model=DEFAULT_BASE_MODEL,
        quantization="nf4",
        device="cpu",
        omp_threads=threads,
        cpu_count=os.cpu_count(),
    )
    print(numbers)
    assert_soak(result)
