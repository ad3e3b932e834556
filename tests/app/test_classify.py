"""/classify, /classify/batch, health, readiness, metrics, request ids and the error shape."""

from __future__ import annotations

import itertools
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

import app.runtime
from app.main import create_app
from nli.labels import LABELS
from nli.loading import load_base_model
from tests.app.conftest import PAIRS, Scores, error_of, start_client
from tests.app.helpers import make_settings, stream_request

TOL = 1e-4  # the same pair scored alone or in any batch agrees far closer than this


def classify(client: TestClient, pair: tuple[str, str], **extra: Any) -> Any:
    return client.post("/classify", json={"premise": pair[0], "hypothesis": pair[1], **extra})


def test_classify_answers_the_shared_result_object(client: TestClient, reference: Scores) -> None:
    response = classify(client, PAIRS[0])
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"label", "score", "scores", "adapter", "base_model"}
    assert [s["label"] for s in body["scores"]] == list(LABELS)
    probs = [s["score"] for s in body["scores"]]
    assert abs(sum(probs) - 1) < 1e-5
    assert body["label"] == LABELS[int(np.argmax(probs))] and body["score"] == max(probs)
    assert body["adapter"] == "base"  # no default adapter configured for the tiny model
    np.testing.assert_allclose(probs, reference([PAIRS[0]], None)[0], atol=TOL)


def test_classify_with_each_adapter_matches_sequential_scores(
    client: TestClient, reference: Scores
) -> None:
    for name in ("alpha", "beta"):
        assert client.post("/adapters", json={"name": name}).status_code == 200
    for adapter in ("alpha", "beta", "base"):
        for pair in PAIRS[:3]:
            body = classify(client, pair, adapter=adapter).json()
            assert body["adapter"] == adapter
            probs = [s["score"] for s in body["scores"]]
            np.testing.assert_allclose(probs, reference([pair], adapter)[0], atol=TOL)
    # The adapters really differ: a wrong one would be caught.
    assert np.abs(reference(PAIRS, "alpha") - reference(PAIRS, "beta")).max() > 20 * TOL


def test_batch_answers_in_input_order(client: TestClient, reference: Scores) -> None:
    pairs = [{"premise": p, "hypothesis": h} for p, h in PAIRS]
    response = client.post("/classify/batch", json={"pairs": pairs, "adapter": "base"})
    assert response.status_code == 200
    results = response.json()["results"]
    assert len(results) == len(PAIRS)
    got = np.array([[s["score"] for s in r["scores"]] for r in results])
    np.testing.assert_allclose(got, reference(PAIRS, None), atol=TOL)


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({"premise": "", "hypothesis": "x"}, "premise"),
        ({"premise": "   ", "hypothesis": "x"}, "premise"),
        ({"premise": "x"}, "hypothesis"),
        ({"premise": "x", "hypothesis": "y", "colour": "red"}, "colour"),
        ({"premise": 3, "hypothesis": "y"}, "premise"),
        ({"premise": "x", "hypothesis": "y", "adapter": "../etc"}, "adapter"),
        ({"premise": "x" * 2001, "hypothesis": "y"}, "premise"),
        ({"premise": "x", "hypothesis": "y" * 2001}, "hypothesis"),
    ],
)
def test_invalid_bodies_are_422(client: TestClient, body: dict[str, Any], where: str) -> None:
    response = client.post("/classify", json=body)
    assert response.status_code == 422
    error = error_of(response)
    assert error["type"] == "validation_error"
    assert where in error["message"]
    assert all("input" not in e for e in error["details"]["errors"])  # input is never echoed


def test_batch_limits_are_422(client: TestClient) -> None:
    pair = {"premise": "a", "hypothesis": "b"}
    assert client.post("/classify/batch", json={"pairs": []}).status_code == 422
    too_many = client.post("/classify/batch", json={"pairs": [pair] * 1025})
    assert too_many.status_code == 422
    assert "1024" in error_of(too_many)["message"]
    long_text = {"premise": "a", "hypothesis": "b" * 2001}
    response = client.post("/classify/batch", json={"pairs": [pair, long_text]})
    assert response.status_code == 422
    assert error_of(response)["details"]["errors"][0]["loc"] == ["body", "pairs", 1, "hypothesis"]


def test_malformed_json_is_422(client: TestClient) -> None:
    response = client.post(
        "/classify", content=b'{"premise": "a", ', headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    error_of(response)


def test_unknown_adapter_is_404(client: TestClient) -> None:
    response = classify(client, PAIRS[0], adapter="nope")
    assert response.status_code == 404
    assert error_of(response)["type"] == "adapter_not_found"


def test_unknown_route_and_method_use_the_error_shape(client: TestClient) -> None:
    missing = client.get("/no/such/route")
    assert missing.status_code == 404 and error_of(missing)["type"] == "not_found"
    wrong = client.get("/classify")
    assert wrong.status_code == 405 and error_of(wrong)["type"] == "method_not_allowed"


def test_body_over_the_limit_is_413_before_reading(client: TestClient) -> None:
    limit = client.app.state.settings.max_json_body_bytes  # type: ignore[attr-defined]
    declared = client.post(
        "/classify",
        content=b"{}",
        headers={"content-type": "application/json", "content-length": str(limit + 1)},
    )
    assert declared.status_code == 413
    assert error_of(declared)["type"] == "payload_too_large"

    endless = itertools.repeat(b" " * (1 << 20), 1000)  # a GB, never read whole
    status, pulled = stream_request(
        client, "/classify", content_type="application/json", chunks=endless
    )
    assert status == 413
    assert pulled <= limit // (1 << 20) + 2


def test_request_id_is_taken_or_generated(client: TestClient) -> None:
    given = client.get("/health", headers={"X-Request-ID": "abc-123"})
    assert given.headers["x-request-id"] == "abc-123"
    generated = client.get("/health")
    assert len(generated.headers["x-request-id"]) == 32
    unsafe = client.get("/health", headers={"X-Request-ID": "bad id\twith spaces"})
    assert unsafe.headers["x-request-id"] != "bad id\twith spaces"
    error = client.get("/nowhere", headers={"X-Request-ID": "trace-9"})
    assert error_of(error)["request_id"] == "trace-9"


def test_health_ready_and_docs(client: TestClient) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready").json()
    assert ready["status"] == "ready" and ready["default_adapter"] == "base"
    assert client.get("/docs").status_code == 200
    schema = client.get("/openapi.json").json()
    classify_op = schema["paths"]["/classify"]["post"]
    assert {"404", "413", "422", "503"} <= set(classify_op["responses"])
    pair = schema["components"]["schemas"]["ClassifyRequest"]["properties"]["premise"]
    assert pair["maxLength"] == 2000
    assert client.get("/").status_code == 200
    assert "text/html" in client.get("/").headers["content-type"]


def test_metrics_use_route_templates_not_raw_paths(client: TestClient) -> None:
    classify(client, PAIRS[0])
    client.get("/evaluate/some-secret-job-id")
    client.get("/a/raw/path/that/does/not/exist")
    text = client.get("/metrics").text
    assert 'route="/classify"' in text
    assert 'route="/evaluate/{job_id}"' in text
    assert "some-secret-job-id" not in text and "/a/raw/path" not in text
    assert "nli_batch_rows_bucket" in text and "nli_queue_depth" in text
    assert "nli_adapters_loaded" in text
    assert 'nli_classified_pairs_total{adapter="base",route="/classify"}' in text


def test_unhandled_errors_are_500_without_internals(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(app.runtime, "build_result", broken)
    quiet = TestClient(client.app, raise_server_exceptions=False)
    response = quiet.post("/classify", json={"premise": "a", "hypothesis": "b"})
    assert response.status_code == 500
    error = error_of(response)
    assert error["type"] == "internal_error"
    assert "secret" not in response.text


def test_not_ready_is_503_with_retry_after(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = threading.Event()

    def slow_load(*args: Any, **kwargs: Any) -> Any:
        gate.wait(30)
        return load_base_model(*args, **kwargs)

    monkeypatch.setattr(app.runtime, "load_base_model", slow_load)
    application = create_app(make_settings(tiny_llama_dir, tmp_path))
    with TestClient(application) as client:
        assert client.get("/health").status_code == 200  # answers at once
        for method, path in [("GET", "/ready"), ("POST", "/classify"), ("GET", "/adapters")]:
            kwargs = {"json": {"premise": "a", "hypothesis": "b"}} if method == "POST" else {}
            response = client.request(method, path, **kwargs)
            assert response.status_code == 503, path
            assert response.headers["retry-after"] == "5"
            assert error_of(response)["type"] == "not_ready"
        gate.set()
        assert application.state.runtime.wait(60) == "ready"
        assert client.get("/ready").status_code == 200


def test_failed_load_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fatal: list[str] = []
    settings = make_settings(tmp_path / "no-such-model", tmp_path)
    application = create_app(settings, on_fatal=fatal.append)
    with TestClient(application) as client:
        assert application.state.runtime.wait(60) == "failed"
        response = client.get("/ready")
        assert response.status_code == 503
        assert "could not start" in error_of(response)["message"]
    assert fatal and "no-such-model" in fatal[0]


def test_queue_full_is_503_with_retry_after(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = start_client(make_settings(tiny_llama_dir, tmp_path, max_queue=1))
    try:
        engine = client.app.state.runtime.require_ready().engine  # type: ignore[attr-defined]
        release = threading.Event()
        # Hold the worker in a command so that requests pile up in the queue.
        blocker = engine.run_exclusive(lambda: release.wait(30))
        results: list[int] = []

        def call() -> None:
            results.append(classify(client, PAIRS[0]).status_code)

        first = threading.Thread(target=call)
        first.start()
        while engine.queue_depth() < 1:
            pass
        full = classify(client, PAIRS[1])
        assert full.status_code == 503
        assert full.headers["retry-after"] == "1"
        assert error_of(full)["type"] == "queue_full"
        release.set()
        blocker.result(10)
        first.join(30)
        assert results == [200]
    finally:
        client.__exit__(None, None, None)


def test_cors_is_off(client: TestClient) -> None:
    origin = {"Origin": "https://elsewhere.example"}
    simple = client.get("/health", headers=origin)
    assert "access-control-allow-origin" not in simple.headers
    preflight = client.options(
        "/classify", headers={**origin, "Access-Control-Request-Method": "POST"}
    )
    assert preflight.status_code == 405
    assert "access-control-allow-origin" not in preflight.headers


def test_405_lists_every_allowed_method(client: TestClient) -> None:
    response = client.put("/evaluate/some-job")
    assert response.status_code == 405
    assert response.headers["allow"] == "DELETE, GET"


def test_a_body_that_is_not_utf8_is_422(client: TestClient) -> None:
    response = client.post(
        "/classify",
        content=b'{"premise": "\xff\xfe"}',
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 422
    assert error_of(response)["type"] == "validation_error"


def test_openapi_declares_authentication_only_with_a_key(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    open_app = create_app(make_settings(tiny_llama_dir, tmp_path))
    load = open_app.openapi()["paths"]["/adapters"]["post"]
    assert "security" not in load and "401" not in load["responses"]
    keyed = create_app(make_settings(tiny_llama_dir, tmp_path, api_key="k"))
    load = keyed.openapi()["paths"]["/adapters"]["post"]
    assert load["security"] and {"401", "403"} <= set(load["responses"])


def test_out_of_memory_splits_the_batch_and_answers_stay_right(
    client: TestClient, reference: Scores, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Simulated OOM on any forward of more than two rows: the classifier halves and retries."""
    import torch

    classifier = client.app.state.runtime.require_ready().classifier  # type: ignore[attr-defined]
    forward = classifier._forward
    sizes: list[int] = []

    def tight_memory(seqs: Any, adapters: Any) -> Any:
        sizes.append(len(seqs))
        if len(seqs) > 2:
            raise torch.OutOfMemoryError("simulated")
        return forward(seqs, adapters)

    monkeypatch.setattr(classifier, "_forward", tight_memory)
    pairs = [{"premise": p, "hypothesis": h} for p, h in PAIRS]
    response = client.post("/classify/batch", json={"pairs": pairs, "adapter": "base"})
    assert response.status_code == 200
    got = np.array([[s["score"] for s in r["scores"]] for r in response.json()["results"]])
    np.testing.assert_allclose(got, reference(PAIRS, None), atol=TOL)
    assert max(sizes) == len(PAIRS) and 2 in sizes


def test_dequantized_service_scores_like_the_packed_one(
    tiny_llama_dir: Path, tmp_path: Path, adapter_store: Path, reference: Scores
) -> None:
    """``NLI_DEQUANTIZE``: same NF4 values held expanded; /ready says so, adapters still load."""
    from tests.app.conftest import fill_adapters_dir

    fill_adapters_dir(adapter_store, tmp_path / "adapters", ["alpha"])
    client = start_client(make_settings(tiny_llama_dir, tmp_path, dequantize=True))
    try:
        ready = client.get("/ready").json()
        assert ready["dequantized"] is True and ready["quantization"] == "nf4"
        assert ready["cuda_graphs"] == "off"  # CPU
        assert ready["cuda_graphs_recorded"] == 0
        assert client.post("/adapters", json={"name": "alpha"}).status_code == 200
        for adapter in ("alpha", "base"):
            for pair in PAIRS[:3]:
                body = classify(client, pair, adapter=adapter).json()
                probs = [s["score"] for s in body["scores"]]
                # Other matmul kernels, same weights: bf16 rounding apart, far under the gap
                # between two adapters.
                np.testing.assert_allclose(probs, reference([pair], adapter)[0], atol=2e-3)
    finally:
        client.__exit__(None, None, None)


@pytest.mark.parametrize("merge", [True, False], ids=["merge", "no-merge"])
def test_a_cpu_service_merges_its_steady_default_adapter(
    tiny_llama_dir: Path, tmp_path: Path, adapter_store: Path, reference: Scores, merge: bool
) -> None:
    """``NLI_CPU_MERGE``: after a streak of requests for the default adapter it is scored from a
    merged copy of the dequantized weights, with the scores it had before."""
    from nli.cpu_merge import MERGE_AFTER
    from tests.app.conftest import fill_adapters_dir

    fill_adapters_dir(adapter_store, tmp_path / "adapters", ["alpha"])
    settings = make_settings(
        tiny_llama_dir, tmp_path, dequantize=True, default_adapter="alpha", cpu_merge=merge
    )
    client = start_client(settings)
    try:
        ready: list[Any] = []
        client.app.state.runtime.on_ready(ready.append)  # type: ignore[attr-defined]
        merger = ready[0].classifier.cpu_merge
        for i in range(MERGE_AFTER + 2):
            pair = PAIRS[i % 3]
            body = classify(client, pair).json()
            probs = [s["score"] for s in body["scores"]]
            # Dequantized (2e-3 apart, test above) and merged: rounding apart, still far under
            # the gap between two adapters.
            np.testing.assert_allclose(probs, reference([pair], "alpha")[0], atol=5e-3)
        if merge:
            assert merger is not None and merger.holds is not None  # alpha's internal name
        else:
            assert merger is None
    finally:
        client.__exit__(None, None, None)
