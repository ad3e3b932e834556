"""Security properties not already proven in ``tests/app``.

Already there: admin routes refuse without or with a wrong key (``test_adapters.py::
test_admin_routes_need_the_key``); adapter names with ``../``, absolute paths, symlinks out of
the adapters dir and URL-encoded escapes reach nothing (``test_adapters.py::test_names_...``,
``test_url_encoded_escapes_reach_nothing``, ``test_symlinks_out_of_the_adapters_dir_are_
refused``); pickle-only adapter folders are refused (``test_adapters.py::test_corrupt_...``);
body and upload limits are enforced while the body streams in (``test_classify.py::test_body_
over_the_limit_is_413_before_reading``, ``test_evaluate.py::test_upload_limits_are_413_before_
the_whole_body_is_read``); CORS is off (``test_classify.py::test_cors_is_off``); a 500 carries no
internals (``test_classify.py::test_unhandled_errors_are_500_without_internals``).
"""

from __future__ import annotations

import hmac
import json
import os
import pickle
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file

import app.evaluation
from nli.manifest import WEIGHTS_FILE
from tests.app.conftest import PAIRS, Scores, error_of, fill_adapters_dir, start_client
from tests.app.helpers import make_settings

KEY = "correct horse battery staple"
AUTH = {"Authorization": f"Bearer {KEY}"}
TOL = 1e-4


@pytest.fixture()
def service(
    tiny_llama_dir: Path, tmp_path: Path, adapter_store: Path
) -> Iterator[tuple[TestClient, Path]]:
    fill_adapters_dir(adapter_store, tmp_path / "adapters", ["alpha", "beta"])
    client = start_client(make_settings(tiny_llama_dir, tmp_path, api_key=KEY))
    try:
        yield client, tmp_path
    finally:
        client.__exit__(None, None, None)


def test_the_api_key_is_compared_in_constant_time(
    service: tuple[TestClient, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every admin request's key goes through ``hmac.compare_digest``, whatever its length or
    how much of it matches (no early exit on a length or prefix check before it)."""
    client, _ = service
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(given: Any, expected: Any) -> bool:
        compared.append((given, expected))
        return real(given, expected)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    for given, status in [
        ("x", 403),  # short
        (KEY[:-1] + "X", 403),  # all but the last character
        (KEY + "-and-more", 403),  # longer
        (KEY, 200),
    ]:
        response = client.post(
            "/adapters", json={"name": "alpha"}, headers={"Authorization": f"Bearer {given}"}
        )
        assert response.status_code == status
        assert compared[-1] == (given.encode(), KEY.encode())
    assert len(compared) == 4


class Tripwire:
    """Stands in for every pickle entry point; records any call and refuses it."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, name: str) -> Any:
        def refuse(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            raise AssertionError(f"{name} was called")

        return refuse


@pytest.fixture()
def tripwire(monkeypatch: pytest.MonkeyPatch) -> Tripwire:
    wire = Tripwire()
    for module, name in [(torch, "load"), (pickle, "load"), (pickle, "loads")]:
        monkeypatch.setattr(module, name, wire(f"{module.__name__}.{name}"))
    monkeypatch.setattr(pickle, "Unpickler", wire("pickle.Unpickler"))
    return wire


class Payload:
    """Unpickling this creates a folder: proof that a pickle ran, if it ever did."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.marker),))


def test_adapters_load_from_safetensors_only_never_pickle(
    service: tuple[TestClient, Path], adapter_store: Path, reference: Scores, tripwire: Tripwire
) -> None:
    client, root = service
    # Only pickled weights (what torch.save writes): refused, and the pickle is never opened.
    pickled = root / "adapters" / "pickled"
    shutil.copytree(adapter_store / "gamma", pickled)
    tensors = load_file(pickled / WEIGHTS_FILE)
    (pickled / WEIGHTS_FILE).unlink()
    with open(pickled / "adapter_model.bin", "wb") as handle:
        pickle.Pickler(handle).dump({k: v.numpy() for k, v in tensors.items()})
    refused = client.post("/adapters", json={"name": "pickled"}, headers=AUTH)
    assert refused.status_code == 400
    assert "only safetensors" in error_of(refused)["message"]
    # Both: the safetensors weights are used, the (malicious) pickle next to them never runs.
    marker = root / "pwned"
    both = root / "adapters" / "both"
    shutil.copytree(adapter_store / "beta", both)
    with open(both / "adapter_model.bin", "wb") as handle:
        pickle.Pickler(handle).dump(Payload(marker))
    loaded = client.post("/adapters", json={"name": "both"}, headers=AUTH)
    assert loaded.status_code == 200, loaded.text
    body = {"premise": PAIRS[0][0], "hypothesis": PAIRS[0][1], "adapter": "both"}
    scores = [s["score"] for s in client.post("/classify", json=body).json()["scores"]]
    np.testing.assert_allclose(scores, reference([PAIRS[0]], "beta")[0], atol=TOL)
    assert tripwire.calls == []
    assert not marker.exists()


@pytest.mark.parametrize(
    "filename",
    [
        "../../../../evil.jsonl",
        "/tmp/evil.jsonl",
        "..\\..\\..\\evil.jsonl",
        "uploads/../../evil.jsonl",
        "....//....//evil.jsonl",
    ],
)
def test_upload_names_cannot_choose_where_the_upload_is_written(
    service: tuple[TestClient, Path], tmp_path: Path, filename: str
) -> None:
    """The client's file name is only a display name: the upload is stored under a random name
    in the uploads dir, and reports show the name without any folder part."""
    client, root = service
    rows = "".join(
        json.dumps({"premise": p, "hypothesis": h, "label": i % 3}) + "\n"
        for i, (p, h) in enumerate(PAIRS)
    ).encode()
    response = client.post("/evaluate", files={"file": (filename, rows)})
    assert response.status_code == 200, response.text
    assert response.json()["source"] == "evil.jsonl"
    accepted = client.post("/evaluate", files={"file": (filename, rows)}, data={"async": "true"})
    assert accepted.status_code == 202
    for folder in (root, root.parent, Path("/tmp"), root / "data"):
        assert not (folder / "evil.jsonl").exists()
    uploads = list((root / "data" / "uploads").iterdir())
    assert all(p.parent == root / "data" / "uploads" and "evil" not in p.name for p in uploads)


@pytest.mark.parametrize(
    "adapter", ["../alpha", "..%2Falpha", "%2e%2e", "/etc", "alpha/../../beta", ".alpha"]
)
def test_adapter_names_in_requests_cannot_escape(
    service: tuple[TestClient, Path], adapter: str
) -> None:
    """The routes not covered in ``tests/app``: the default adapter, classify and evaluate."""
    client, _ = service
    pair = {"premise": "a", "hypothesis": "b"}
    for response in (
        client.put("/adapters/default", json={"name": adapter}, headers=AUTH),
        client.post("/classify", json={**pair, "adapter": adapter}),
        client.post("/classify/batch", json={"pairs": [pair], "adapter": adapter}),
        client.post(
            "/evaluate",
            files={"file": ("a.jsonl", b'{"premise": "a", "hypothesis": "b", "label": 0}\n')},
            data={"adapter": adapter},
        ),
    ):
        assert response.status_code == 422, response.text
        error_of(response)
    assert client.get("/adapters").json()["loaded"] == []


def test_a_job_that_fails_on_a_bug_says_nothing_internal(
    service: tuple[TestClient, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected exception in an evaluation job (sync: a 500, async: a failed job): the
    answers name the exception type only, never its message, paths or a traceback."""
    client, _ = service

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("secret detail at /srv/internal/path.py")

    monkeypatch.setattr(app.evaluation, "evaluate_dataset", broken)
    rows = b'{"premise": "a", "hypothesis": "b", "label": 0}\n'
    quiet = TestClient(client.app, raise_server_exceptions=False)
    sync = quiet.post("/evaluate", files={"file": ("a.jsonl", rows)})
    assert sync.status_code == 500
    assert error_of(sync)["type"] == "internal_error"
    accepted = quiet.post("/evaluate", files={"file": ("a.jsonl", rows)}, data={"async": "true"})
    job_id = accepted.json()["job_id"]
    for _ in range(600):
        job = quiet.get(f"/evaluate/{job_id}").json()
        if job["status"] == "failed":
            break
        time.sleep(0.05)
    assert job["error"] == {"type": "internal_error", "message": "internal error (RuntimeError)"}
    for response_text in (sync.text, json.dumps(job)):
        assert "secret" not in response_text and "Traceback" not in response_text
        assert "/srv" not in response_text
