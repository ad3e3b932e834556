"""Fixtures of the service tests: test adapters on the tiny model, settings, clients, and
reference scores computed without the service."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from nli.classifier import NLIClassifier
from nli.loading import load_base_model
from tests.app.helpers import make_adapters, make_settings

# Adapters every service test can load: name -> seed. "alpha-v2" holds other weights for swaps.
ADAPTERS = {"alpha": 1, "beta": 2, "gamma": 3}
ALTERNATES = {"alpha-v2": 4}
PAIRS = [
    ("a man is playing guitar in the park", "a man plays music"),
    ("two dogs are running on the beach", "the dogs are not outside"),
    ("a woman is eating at a big red table", "nobody is eating"),
    ("the child is sitting", "a child is sitting inside"),
    ("a group of people on the street", "people are outside"),
    ("an old man with a bike", "a young woman is running in the snow with a big green ball"),
]

Scores = Callable[[Sequence[tuple[str, str]], str | None], np.ndarray]


@pytest.fixture(scope="session")
def adapter_store(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:
    """A folder with the test adapters, made once per session."""
    root = tmp_path_factory.mktemp("adapter-store")
    make_adapters(tiny_llama_dir, root, {**ADAPTERS, **ALTERNATES})
    return root


def fill_adapters_dir(store: Path, target: Path, names: Sequence[str] = tuple(ADAPTERS)) -> Path:
    """Copy adapters from the store into an adapters dir."""
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copytree(store / name, target / name)
    return target


@pytest.fixture(scope="session")
def reference(tiny_llama_dir: Path, adapter_store: Path) -> Scores:
    """Sequential scores of pairs with an adapter (by name) or the base (None / 'base')."""
    base = load_base_model(str(tiny_llama_dir), device="cpu")
    classifier = NLIClassifier(base)
    for name in [*ADAPTERS, *ALTERNATES]:
        classifier.attach_adapter(adapter_store / name, name=name)

    def score(pairs: Sequence[tuple[str, str]], adapter: str | None) -> np.ndarray:
        name = None if adapter in (None, "base") else adapter
        return np.stack([classifier.score_pairs([pair], name)[0] for pair in pairs])

    return score


def start_client(settings: Any, **kwargs: Any) -> TestClient:
    """A TestClient whose lifespan has run and whose model has loaded."""
    app = create_app(settings)
    client = TestClient(app, **kwargs)
    client.__enter__()
    state = app.state.runtime.wait(120)
    assert state == "ready", app.state.runtime.error
    return client


@pytest.fixture(scope="module")
def service_root(tmp_path_factory: pytest.TempPathFactory, adapter_store: Path) -> Path:
    root = tmp_path_factory.mktemp("service")
    fill_adapters_dir(adapter_store, root / "adapters")
    return root


@pytest.fixture(scope="module")
def client(tiny_llama_dir: Path, service_root: Path) -> Iterator[TestClient]:
    """One service per test module (the tiny model loads once), no API key."""
    client = start_client(make_settings(tiny_llama_dir, service_root))
    try:
        yield client
    finally:
        client.__exit__(None, None, None)


def error_of(response: Any) -> dict[str, Any]:
    """The ``error`` object of an error response, after checking the one shape."""
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert {"type", "message", "request_id"} <= set(error), error
    assert error["request_id"] == response.headers["x-request-id"]
    assert "Traceback" not in response.text
    return dict(error)
