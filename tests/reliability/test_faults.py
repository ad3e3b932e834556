"""Faults: corrupt adapter folders, out of memory in a batch, and a training run killed while it
saves an adapter into a live service's adapters dir.

Already proven in ``tests/app`` and not repeated here: broken manifest JSON, truncated weights,
pickle-only weights and a manifest naming another base model are 400s that change nothing
(``test_adapters.py::test_corrupt_adapters_are_400_and_change_nothing``); a batch that runs out
of memory is halved and retried (``test_classify.py::test_out_of_memory_splits_the_batch...``,
``test_engine.py::test_out_of_memory_fails_only_the_request_that_cannot_fit``); a job cut off by
``kill -9`` is ``failed`` with its reason after the restart, and a new job runs
(``test_server.py::test_a_job_cut_off_by_kill_9_fails_with_its_reason_and_new_jobs_run``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from app.registry import folder_fingerprint
from nli.labels import LABELS
from nli.loading import load_base_model
from nli.manifest import MANIFEST_FILE, PEFT_CONFIG_FILE, WEIGHTS_FILE
from tests.app.conftest import PAIRS, Scores, error_of, fill_adapters_dir, start_client
from tests.app.helpers import REPO, make_adapter, make_settings

TOL = 1e-4  # the same pair scored alone or in any batch agrees far closer than this

# -- corrupt adapter folders ------------------------------------------------------------------


def _edit_json(folder: Path, name: str, change: Callable[[dict[str, Any]], None]) -> None:
    data = json.loads((folder / name).read_text())
    change(data)
    (folder / name).write_text(json.dumps(data))


def _edit_weights(folder: Path, change: Callable[[dict[str, torch.Tensor]], Any]) -> None:
    save_file(change(load_file(folder / WEIGHTS_FILE)), folder / WEIGHTS_FILE)


CORRUPTIONS: dict[str, tuple[Callable[[Path], None], str]] = {
    # name: (how the folder is broken, what the message says)
    "manifest-not-an-object": (
        lambda f: (f / MANIFEST_FILE).write_text("[]"),
        "must hold a JSON object",
    ),
    "manifest-not-utf8": (
        lambda f: (f / MANIFEST_FILE).write_bytes(b"\xff\xfe{}"),
        "is not valid JSON",
    ),
    "manifest-missing-a-field": (
        lambda f: _edit_json(f, MANIFEST_FILE, lambda m: m.pop("base_model_fingerprint")),
        "missing field 'base_model_fingerprint'",
    ),
    "manifest-unknown-prompt-format": (
        lambda f: _edit_json(f, MANIFEST_FILE, lambda m: m.update(prompt_format=99)),
        "prompt format 99",
    ),
    "manifest-other-label-words": (
        lambda f: _edit_json(f, MANIFEST_FILE, lambda m: m.update(label_words=["yes", "no"])),
        "label words",
    ),
    "peft-config-not-json": (
        lambda f: (f / PEFT_CONFIG_FILE).write_text("{"),
        "cannot be loaded",
    ),
    "peft-config-targets-absent-modules": (
        lambda f: _edit_json(f, PEFT_CONFIG_FILE, lambda c: c.update(target_modules=["nope"])),
        "cannot be loaded",
    ),
    "weights-without-tensors": (
        lambda f: _edit_weights(f, lambda t: {}),
        "28 of its 28 tensors are missing",
    ),
    "weights-with-half-the-tensors": (
        lambda f: _edit_weights(f, lambda t: {k: t[k] for k in sorted(t)[: len(t) // 2]}),
        "14 of its 28 tensors are missing",
    ),
    "weights-with-renamed-tensors": (
        lambda f: _edit_weights(
            f, lambda t: {k.replace("lora_A", "lora_Z"): v for k, v in t.items()}
        ),
        "tensors are not the adapter's",
    ),
    "weights-of-the-wrong-shape": (
        lambda f: _edit_weights(f, lambda t: {k: torch.cat([v, v]) for k, v in t.items()}),
        "size mismatch",
    ),
    "weights-with-nan": (
        lambda f: _edit_weights(
            f, lambda t: {k: torch.full_like(v, float("nan")) for k, v in t.items()}
        ),
        "NaN or inf",
    ),
    "weights-a-folder": (
        lambda f: ((f / WEIGHTS_FILE).unlink(), (f / WEIGHTS_FILE).mkdir()),
        f"no {WEIGHTS_FILE}",
    ),
}


@pytest.fixture(scope="module")
def admin(
    tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory, adapter_store: Path
) -> Iterator[tuple[TestClient, Path]]:
    """One service for the module, "alpha" loaded and the default: every failed load must leave
    it exactly as it was, so leftovers of one case would show in the next."""
    root = tmp_path_factory.mktemp("faults")
    fill_adapters_dir(adapter_store, root / "adapters", ["alpha", "beta"])
    client = start_client(make_settings(tiny_llama_dir, root, default_adapter="alpha"))
    try:
        yield client, root
    finally:
        client.__exit__(None, None, None)


def registry_state(client: TestClient) -> tuple[Any, ...]:
    listing = client.get("/adapters").json()
    classifier = client.app.state.runtime.require_ready().classifier  # type: ignore[attr-defined]
    return listing["default"], listing["loaded"], sorted(classifier.adapters)


def probs_of(response: Any) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.array([s["score"] for s in response.json()["scores"]])


@pytest.mark.parametrize("corruption", list(CORRUPTIONS), ids=str)
def test_a_corrupt_adapter_is_400_and_changes_nothing(
    admin: tuple[TestClient, Path], adapter_store: Path, reference: Scores, corruption: str
) -> None:
    client, root = admin
    before = registry_state(client)
    folder = root / "adapters" / corruption
    shutil.copytree(adapter_store / "gamma", folder)
    corrupt, message = CORRUPTIONS[corruption]
    corrupt(folder)
    response = client.post("/adapters", json={"name": corruption})
    assert response.status_code == 400, response.text[:300]
    error = error_of(response)
    assert error["type"] == "invalid_adapter"
    assert message in error["message"], error["message"]
    assert not re.search(r"'nli_\d+'", error["message"])  # the folder's name, not PEFT's
    assert registry_state(client) == before
    answer = client.post("/classify", json={"premise": PAIRS[0][0], "hypothesis": PAIRS[0][1]})
    np.testing.assert_allclose(probs_of(answer), reference([PAIRS[0]], "alpha")[0], atol=TOL)
    assert (
        client.post(
            "/classify", json={"premise": "a", "hypothesis": "b", "adapter": corruption}
        ).status_code
        == 404
    )


def test_an_adapter_trained_on_another_base_model_is_400(
    admin: tuple[TestClient, Path], tiny_qwen2_dir: Path
) -> None:
    """A real adapter of the other tiny family (same layer shapes, so PEFT alone would load it)."""
    client, root = admin
    before = registry_state(client)
    make_adapter(
        load_base_model(str(tiny_qwen2_dir), device="cpu"), root / "adapters" / "qwen", seed=7
    )
    response = client.post("/adapters", json={"name": "qwen"})
    assert response.status_code == 400
    assert "trained on base model" in error_of(response)["message"]
    assert registry_state(client) == before


# -- out of memory ----------------------------------------------------------------------------

POISON = ("a man " * 60 + "is sitting", "a man is sitting")  # long: never fits, even alone


def test_out_of_memory_in_a_batch_is_split_and_other_requests_are_unaffected(
    admin: tuple[TestClient, Path], reference: Scores, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Simulated OOM for any forward of more than two rows, and for the long pair at any size:
    requests queued together (several adapters) are answered exactly as scored alone; only the
    request that cannot fit even alone fails, with a 503 the client may retry."""
    client, _ = admin
    assert client.post("/adapters", json={"name": "beta"}).status_code == 200
    ready = client.app.state.runtime.require_ready()  # type: ignore[attr-defined]
    forward = ready.classifier._forward
    sizes: list[int] = []

    def tight_memory(seqs: Any, adapters: Any) -> Any:
        sizes.append(len(seqs))
        if len(seqs) > 2 or max(len(seq) for seq in seqs) > 100:
            raise torch.OutOfMemoryError("simulated")
        return forward(seqs, adapters)

    monkeypatch.setattr(ready.classifier, "_forward", tight_memory)
    requests = [(pair, adapter) for pair in PAIRS for adapter in ("base", "alpha", "beta")]
    gate = threading.Event()
    blocker = ready.engine.run_exclusive(lambda: gate.wait(30))

    def classify(pair: tuple[str, str], adapter: str) -> Any:
        body = {"premise": pair[0], "hypothesis": pair[1], "adapter": adapter}
        return client.post("/classify", json=body)

    with ThreadPoolExecutor(len(requests) + 1) as pool:
        futures = [pool.submit(classify, pair, adapter) for pair, adapter in requests]
        poison = pool.submit(classify, POISON, "alpha")
        while ready.engine.queue_depth() < len(requests) + 1:
            time.sleep(0.01)
        gate.set()
        blocker.result(10)
        answers = [future.result(60) for future in futures]
        failed = poison.result(60)
    assert failed.status_code == 503 and failed.headers["retry-after"] == "1"
    assert error_of(failed)["type"] == "resource_exhausted"
    for (pair, adapter), answer in zip(requests, answers, strict=True):
        assert answer.json()["adapter"] == adapter
        np.testing.assert_allclose(probs_of(answer), reference([pair], adapter)[0], atol=TOL)
    assert max(sizes) > 2 and 1 in sizes  # one batch first, split down to single rows
    monkeypatch.undo()
    assert classify(POISON, "alpha").status_code == 200  # memory back: the same request works
    assert "nli_oom_failures_total 1.0" in client.get("/metrics").text


# -- a crash while training saves an adapter --------------------------------------------------


def training_recipe(folder: Path, base_dir: Path, output: Path, *, overwrite: bool = False) -> Path:
    """A recipe that trains the tiny model for two steps on a few rows."""
    rows = [
        {"premise": p, "hypothesis": h, "label": LABELS[i % 3]}
        for i, (p, h) in enumerate(PAIRS * 8)
    ]
    folder.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", rows[:36]), ("dev", rows[36:])):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    recipe = {
        "name": "crash",
        "model": {"base_model": str(base_dir), "device": "cpu", "max_length": 96},
        "lora": {"r": 4, "alpha": 8},
        "data": {
            "train_file": str(folder / "train.jsonl"),
            "dev_file": str(folder / "dev.jsonl"),
            "dev_rows": ":12",
            "cache_dir": str(folder / "tokenized"),
        },
        "train": {
            "max_steps": 2,
            "batch_size": 12,
            "dataloader_workers": 0,
            "report_to": "none",
            "learning_rate": 1e-3,
        },
        "eval": {
            "strategy": "steps",
            "steps": 2,
            "early_stopping_patience": None,
            "collapse_accuracy": None,
            "compare_base": False,
        },
        "output": {"dir": str(output), "overwrite": overwrite},
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def train_and_get_killed(recipe: Path, point: str, log: Path) -> int:
    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with open(log, "wb") as out:
        process = subprocess.run(
            [sys.executable, "-m", "tests.reliability.crash_training", str(recipe), point],
            cwd=REPO,
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=300,
        )
    return process.returncode


class Watcher:
    """Lists the service's adapters over and over while something writes into its folder."""

    def __init__(self, client: TestClient) -> None:
        self.client = client
        self.seen: set[str] = set()
        self.listings = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.seen.update(self.client.get("/adapters").json()["available"])
            self.listings += 1
            time.sleep(0.01)

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.fixture()
def training_service(
    tiny_llama_dir: Path, tmp_path: Path, adapter_store: Path
) -> Iterator[tuple[TestClient, Path]]:
    fill_adapters_dir(adapter_store, tmp_path / "adapters", ["alpha"])
    client = start_client(make_settings(tiny_llama_dir, tmp_path))
    assert client.post("/adapters", json={"name": "alpha"}).status_code == 200
    try:
        yield client, tmp_path
    finally:
        client.__exit__(None, None, None)


@pytest.mark.parametrize("point", ["weights", "report"])
def test_a_training_killed_while_saving_leaves_nothing_listed_or_loadable(
    training_service: tuple[TestClient, Path], tiny_llama_dir: Path, point: str
) -> None:
    """kill -9 while the adapter's weights are half written, or when all but the report is:
    the half-written folder exists (hidden) but is never listed, and no name loads it; a new
    run afterwards writes a complete adapter that loads."""
    client, root = training_service
    adapters = root / "adapters"
    recipe = training_recipe(root / "run", tiny_llama_dir, adapters / "fresh")
    with Watcher(client) as watcher:
        code = train_and_get_killed(recipe, point, root / "train.log")
    log = (root / "train.log").read_text(errors="replace")
    assert code == -9 and f"killed at {point}" in log, log[-2000:]
    assert watcher.listings > 10
    assert watcher.seen == {"alpha"}
    leftovers = [p for p in adapters.iterdir() if p.name.startswith(".fresh.")]
    assert leftovers, "the kill left no half-written folder behind: nothing was tested"
    if point == "weights":
        weights = leftovers[0] / WEIGHTS_FILE
        assert 0 < weights.stat().st_size  # half a safetensors file
    assert client.get("/adapters").json()["available"] == ["alpha"]
    assert client.post("/adapters", json={"name": "fresh"}).status_code == 404
    for leftover in leftovers:
        refused = client.post("/adapters", json={"name": leftover.name})
        assert refused.status_code == 422  # hidden names are not adapter names
    assert client.post("/adapters", json={"name": "fresh.work"}).status_code in (400, 404)
    if point == "report":
        # The next run (no crash) recovers: a complete adapter, listed and loadable.
        code = subprocess.run(
            [sys.executable, "-m", "training.cli", "train", "--recipe", str(recipe), "--resume"],
            cwd=REPO,
            capture_output=True,
            timeout=300,
        ).returncode
        assert code == 0
        assert "fresh" in client.get("/adapters").json()["available"]
        assert client.post("/adapters", json={"name": "fresh"}).status_code == 200


def test_a_training_killed_while_replacing_an_adapter_never_lists_a_partial_one(
    training_service: tuple[TestClient, Path],
    tiny_llama_dir: Path,
    adapter_store: Path,
    reference: Scores,
) -> None:
    """kill -9 with ``output.overwrite`` between moving the old version aside and renaming the
    new one in: the name is simply absent (both versions are complete, under hidden names);
    the version already loaded keeps serving."""
    client, root = training_service
    adapters = root / "adapters"
    old_fingerprint = folder_fingerprint(adapters / "alpha")
    recipe = training_recipe(root / "run", tiny_llama_dir, adapters / "alpha", overwrite=True)
    with Watcher(client) as watcher:
        code = train_and_get_killed(recipe, "swap", root / "train.log")
    log = (root / "train.log").read_text(errors="replace")
    assert code == -9 and "killed at swap" in log, log[-2000:]
    assert watcher.seen <= {"alpha"}
    assert not (adapters / "alpha").exists()
    hidden = {
        p.name.rsplit(".", 1)[-1]: p for p in adapters.iterdir() if p.name.startswith(".alpha.")
    }
    assert set(hidden) == {"old", "partial"}
    assert folder_fingerprint(hidden["old"]) == old_fingerprint  # the old version, intact
    assert client.get("/adapters").json()["available"] == []
    assert client.post("/adapters", json={"name": "alpha", "replace": True}).status_code == 404
    answer = client.post(
        "/classify", json={"premise": PAIRS[1][0], "hypothesis": PAIRS[1][1], "adapter": "alpha"}
    )
    np.testing.assert_allclose(probs_of(answer), reference([PAIRS[1]], "alpha")[0], atol=TOL)
