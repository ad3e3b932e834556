"""Adapter administration: load, no-op, conflicts, hot-swap, unload, default, auth, path safety,
corrupt folders, start-up defaults, and the base model loading exactly once."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

import app.runtime
from app.main import create_app
from nli.loading import load_base_model
from nli.manifest import MANIFEST_FILE, WEIGHTS_FILE
from tests.app.conftest import PAIRS, Scores, error_of, fill_adapters_dir, start_client
from tests.app.helpers import make_adapter, make_settings

TOL = 1e-4  # the same pair scored alone or in any batch agrees far closer than this
KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture()
def root(tmp_path: Path, adapter_store: Path) -> Path:
    fill_adapters_dir(adapter_store, tmp_path / "adapters")
    return tmp_path


@pytest.fixture()
def admin(tiny_llama_dir: Path, root: Path) -> Iterator[TestClient]:
    """A fresh service per test (adapter state matters here), with an API key."""
    client = start_client(make_settings(tiny_llama_dir, root, api_key=KEY))
    client.headers.update(AUTH)
    try:
        yield client
    finally:
        client.__exit__(None, None, None)


def probs_of(response: Any) -> list[float]:
    assert response.status_code == 200, response.text
    return [s["score"] for s in response.json()["scores"]]


def classify(client: TestClient, pair: tuple[str, str], adapter: str | None = None) -> Any:
    body: dict[str, Any] = {"premise": pair[0], "hypothesis": pair[1]}
    if adapter is not None:
        body["adapter"] = adapter
    return client.post("/classify", json=body)


def peft_names(client: TestClient) -> set[str]:
    classifier = client.app.state.runtime.require_ready().classifier  # type: ignore[attr-defined]
    return set(classifier.adapters)


def test_list_load_noop_and_unload(admin: TestClient) -> None:
    listing = admin.get("/adapters").json()
    assert listing == {"default": "base", "loaded": [], "available": ["alpha", "beta", "gamma"]}
    first = admin.post("/adapters", json={"name": "alpha"})
    assert first.status_code == 200 and first.json()["status"] == "loaded"
    info = first.json()
    assert info["name"] == "alpha" and info["size_bytes"] > 0 and info["source"] == "adapters_dir"
    again = admin.post("/adapters", json={"name": "alpha"})
    assert again.status_code == 200 and again.json()["status"] == "unchanged"
    assert [a["name"] for a in admin.get("/adapters").json()["loaded"]] == ["alpha"]
    assert len(peft_names(admin)) == 1
    gone = admin.delete("/adapters/alpha")
    assert gone.status_code == 200 and gone.json() == {"name": "alpha", "detached": True}
    assert peft_names(admin) == set()
    assert classify(admin, PAIRS[0], "alpha").status_code == 404
    assert error_of(admin.delete("/adapters/alpha"))["type"] == "adapter_not_found"


def test_changed_files_conflict_unless_replaced(
    admin: TestClient, root: Path, adapter_store: Path, reference: Scores
) -> None:
    admin.post("/adapters", json={"name": "alpha"})
    np.testing.assert_allclose(
        probs_of(classify(admin, PAIRS[0], "alpha")), reference([PAIRS[0]], "alpha")[0], atol=TOL
    )
    shutil.rmtree(root / "adapters" / "alpha")
    shutil.copytree(adapter_store / "alpha-v2", root / "adapters" / "alpha")
    conflict = admin.post("/adapters", json={"name": "alpha"})
    assert conflict.status_code == 409 and error_of(conflict)["type"] == "adapter_conflict"
    replaced = admin.post("/adapters", json={"name": "alpha", "replace": True})
    assert replaced.status_code == 200 and replaced.json()["status"] == "replaced"
    np.testing.assert_allclose(
        probs_of(classify(admin, PAIRS[0], "alpha")),
        reference([PAIRS[0]], "alpha-v2")[0],
        atol=TOL,
    )
    assert len(peft_names(admin)) == 1  # the old version was detached


def test_swap_back_gives_exactly_the_scores_of_before(
    admin: TestClient, root: Path, adapter_store: Path
) -> None:
    def scores() -> list[list[float]]:
        return [probs_of(classify(admin, pair, name)) for pair in PAIRS for name in names]

    names = ["base", "alpha"]
    admin.post("/adapters", json={"name": "alpha"})
    before = scores()
    admin.post("/adapters", json={"name": "beta"})
    classify(admin, PAIRS[0], "beta")
    for version in ("alpha-v2", "alpha"):
        shutil.rmtree(root / "adapters" / "alpha")
        shutil.copytree(adapter_store / version, root / "adapters" / "alpha")
        admin.post("/adapters", json={"name": "alpha", "replace": True})
        classify(admin, PAIRS[0], "alpha")
    admin.delete("/adapters/beta")
    admin.delete("/adapters/alpha")
    admin.post("/adapters", json={"name": "alpha"})
    assert scores() == before  # exactly


def test_default_adapter(admin: TestClient, reference: Scores) -> None:
    missing = admin.put("/adapters/default", json={"name": "beta"})
    assert missing.status_code == 404 and error_of(missing)["type"] == "adapter_not_found"
    admin.post("/adapters", json={"name": "beta"})
    assert admin.put("/adapters/default", json={"name": "beta"}).json() == {"default": "beta"}
    answer = classify(admin, PAIRS[1])
    assert answer.json()["adapter"] == "beta"
    np.testing.assert_allclose(probs_of(answer), reference([PAIRS[1]], "beta")[0], atol=TOL)
    blocked = admin.delete("/adapters/beta")
    assert blocked.status_code == 409 and "default" in error_of(blocked)["message"]
    assert admin.put("/adapters/default", json={"name": "base"}).json() == {"default": "base"}
    assert classify(admin, PAIRS[1]).json()["adapter"] == "base"
    assert admin.delete("/adapters/beta").status_code == 200
    assert admin.delete("/adapters/base").status_code == 409


def test_admin_routes_need_the_key(admin: TestClient) -> None:
    anonymous = TestClient(admin.app)
    for method, path, body in [
        ("POST", "/adapters", {"name": "alpha"}),
        ("PUT", "/adapters/default", {"name": "base"}),
        ("DELETE", "/adapters/alpha", None),
    ]:
        missing = anonymous.request(method, path, json=body)
        assert missing.status_code == 401, path
        assert missing.headers["www-authenticate"] == "Bearer"
        assert error_of(missing)["type"] == "unauthorized"
        wrong = anonymous.request(method, path, json=body, headers={"Authorization": "Bearer no"})
        assert wrong.status_code == 403 and error_of(wrong)["type"] == "forbidden"
        basic = anonymous.request(method, path, json=body, headers={"Authorization": "Basic eDp5"})
        assert basic.status_code == 401
    # Reading and classifying need no key.
    assert anonymous.get("/adapters").status_code == 200
    assert classify(anonymous, PAIRS[0]).status_code == 200
    assert admin.post("/adapters", json={"name": "alpha"}).status_code == 200


@pytest.mark.parametrize(
    "name", ["../alpha", "/etc", ".hidden", "a/b", "..", "x" * 65, "", "al pha", "alpha\n"]
)
def test_names_that_are_not_plain_folder_names_are_422(admin: TestClient, name: str) -> None:
    response = admin.post("/adapters", json={"name": name})
    assert response.status_code == 422, name
    error_of(response)


@pytest.mark.parametrize(
    "path",
    ["/adapters/..%2F..%2Fetc", "/adapters/%2e%2e", "/adapters/..%252Fetc", "/adapters/%2Fetc"],
)
def test_url_encoded_escapes_reach_nothing(admin: TestClient, path: str) -> None:
    response = admin.delete(path)
    assert response.status_code in (404, 405, 422), (path, response.status_code)
    error_of(response)


def test_reserved_and_missing_names(admin: TestClient) -> None:
    assert error_of(admin.post("/adapters", json={"name": "base"}))["type"] == "adapter_conflict"
    missing = admin.post("/adapters", json={"name": "nowhere"})
    assert missing.status_code == 404 and error_of(missing)["type"] == "adapter_not_found"


def test_symlinks_out_of_the_adapters_dir_are_refused(
    admin: TestClient, root: Path, adapter_store: Path
) -> None:
    outside = root / "outside"
    shutil.copytree(adapter_store / "beta", outside)
    os.symlink(outside, root / "adapters" / "linked")
    response = admin.post("/adapters", json={"name": "linked"})
    assert response.status_code == 400 and "outside" in error_of(response)["message"]
    assert "linked" not in admin.get("/adapters").json()["available"]
    sneaky = root / "adapters" / "sneaky"
    shutil.copytree(adapter_store / "beta", sneaky)
    (sneaky / WEIGHTS_FILE).unlink()
    os.symlink(outside / WEIGHTS_FILE, sneaky / WEIGHTS_FILE)
    assert admin.post("/adapters", json={"name": "sneaky"}).status_code == 400
    os.symlink(root / "adapters" / "beta", root / "adapters" / "inside")  # inside: fine
    assert admin.post("/adapters", json={"name": "inside"}).status_code == 200
    assert admin.get("/adapters").json()["loaded"][0]["name"] == "inside"


def _break_manifest(folder: Path) -> None:
    (folder / MANIFEST_FILE).write_text("{not json")


def _truncate_weights(folder: Path) -> None:
    data = (folder / WEIGHTS_FILE).read_bytes()
    (folder / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])


def _pickle_only(folder: Path) -> None:
    (folder / WEIGHTS_FILE).rename(folder / "adapter_model.bin")


def _other_base(folder: Path) -> None:
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    manifest.update(base_model="some/other-model", base_model_fingerprint="folder-sha256:0")
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))


@pytest.mark.parametrize("corrupt", [_break_manifest, _truncate_weights, _pickle_only, _other_base])
def test_corrupt_adapters_are_400_and_change_nothing(
    admin: TestClient, root: Path, adapter_store: Path, corrupt: Any, reference: Scores
) -> None:
    admin.post("/adapters", json={"name": "alpha"})
    before = {k: v for k, v in admin.get("/adapters").json().items() if k != "available"}
    shutil.copytree(adapter_store / "gamma", root / "adapters" / "broken")
    corrupt(root / "adapters" / "broken")
    response = admin.post("/adapters", json={"name": "broken"})
    assert response.status_code == 400, response.text
    assert error_of(response)["type"] == "invalid_adapter"
    after = admin.get("/adapters").json()
    assert {k: v for k, v in after.items() if k != "available"} == before
    assert len(peft_names(admin)) == 1
    np.testing.assert_allclose(
        probs_of(classify(admin, PAIRS[0], "alpha")), reference([PAIRS[0]], "alpha")[0], atol=TOL
    )


def test_adapter_files_are_read_before_the_scoring_worker_pauses(
    admin: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    classifier = admin.app.state.runtime.require_ready().classifier  # type: ignore[attr-defined]
    threads: dict[str, list[str]] = {"read": [], "attach": []}
    read_adapter, attach_adapter = classifier.read_adapter, classifier.attach_adapter

    def reading(*args: Any, **kwargs: Any) -> Any:
        threads["read"].append(threading.current_thread().name)
        return read_adapter(*args, **kwargs)

    def attaching(*args: Any, **kwargs: Any) -> Any:
        assert kwargs["read"] is not None  # the registry's read, not a second one
        threads["attach"].append(threading.current_thread().name)
        return attach_adapter(*args, **kwargs)

    monkeypatch.setattr(classifier, "read_adapter", reading)
    monkeypatch.setattr(classifier, "attach_adapter", attaching)
    assert admin.post("/adapters", json={"name": "alpha"}).status_code == 200
    assert len(threads["read"]) == len(threads["attach"]) == 1
    # attach runs on the scoring worker (between two forward passes); reading ran before it,
    # on the request's thread, while requests could still be scored.
    assert threads["read"][0] != threads["attach"][0]


def test_the_weights_attached_are_the_bytes_fingerprinted(
    admin: TestClient,
    root: Path,
    adapter_store: Path,
    reference: Scores,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Weights read once: a file replaced after the registry hashed it does not get attached
    under the old fingerprint (the fast attach, taken once an adapter holds LoRA layers)."""
    import app.registry

    admin.post("/adapters", json={"name": "beta"})  # the LoRA layers the fast attach reuses
    hashed = app.registry._fingerprint_keeping_weights
    fingerprint = app.registry.folder_fingerprint(root / "adapters" / "alpha")

    def hash_then_replace(folder: Path) -> tuple[str, bytes | None]:
        result = hashed(folder)
        shutil.copy(adapter_store / "alpha-v2" / WEIGHTS_FILE, folder / WEIGHTS_FILE)
        return result

    monkeypatch.setattr(app.registry, "_fingerprint_keeping_weights", hash_then_replace)
    loaded = admin.post("/adapters", json={"name": "alpha"})
    assert loaded.status_code == 200 and loaded.json()["fingerprint"] == fingerprint
    np.testing.assert_allclose(
        probs_of(classify(admin, PAIRS[0], "alpha")), reference([PAIRS[0]], "alpha")[0], atol=TOL
    )


def test_swap_and_unload_wait_for_requests_already_routed(
    admin: TestClient, root: Path, adapter_store: Path, reference: Scores
) -> None:
    """Requests queued before a replace or an unload are scored with the version they were
    routed to, and none fails; the unload answers once they are done."""
    admin.post("/adapters", json={"name": "alpha"})
    engine = admin.app.state.runtime.require_ready().engine  # type: ignore[attr-defined]
    gate = threading.Event()
    blocker = engine.run_exclusive(lambda: gate.wait(30))
    with ThreadPoolExecutor(8) as pool:
        queued = [pool.submit(classify, admin, pair, "alpha") for pair in PAIRS]
        while engine.queue_depth() < len(PAIRS):
            time.sleep(0.01)
        shutil.rmtree(root / "adapters" / "alpha")
        shutil.copytree(adapter_store / "alpha-v2", root / "adapters" / "alpha")
        swap = pool.submit(admin.post, "/adapters", json={"name": "alpha", "replace": True})
        time.sleep(0.2)
        gate.set()
        blocker.result(10)
        assert swap.result(30).json()["status"] == "replaced"
        old = np.array([probs_of(f.result(30)) for f in queued])
        np.testing.assert_allclose(old, reference(PAIRS, "alpha"), atol=TOL)
    np.testing.assert_allclose(
        probs_of(classify(admin, PAIRS[0], "alpha")),
        reference([PAIRS[0]], "alpha-v2")[0],
        atol=TOL,
    )
    gate.clear()
    blocker = engine.run_exclusive(lambda: gate.wait(30))
    with ThreadPoolExecutor(8) as pool:
        queued = [pool.submit(classify, admin, pair, "alpha") for pair in PAIRS]
        while engine.queue_depth() < len(PAIRS):
            time.sleep(0.01)
        unload = pool.submit(admin.delete, "/adapters/alpha")
        time.sleep(0.2)
        assert not unload.done()  # waiting for the queued requests
        assert classify(admin, PAIRS[0], "alpha").status_code == 404  # already unlisted
        gate.set()
        blocker.result(10)
        assert unload.result(30).json() == {"name": "alpha", "detached": True}
        done = np.array([probs_of(f.result(30)) for f in queued])
        np.testing.assert_allclose(done, reference(PAIRS, "alpha-v2"), atol=TOL)
    assert peft_names(admin) == set()


def test_default_adapter_from_settings(tiny_llama_dir: Path, root: Path) -> None:
    client = start_client(make_settings(tiny_llama_dir, root, default_adapter="gamma"))
    try:
        listing = client.get("/adapters").json()
        assert listing["default"] == "gamma" and listing["loaded"][0]["name"] == "gamma"
        assert classify(client, PAIRS[0]).json()["adapter"] == "gamma"
    finally:
        client.__exit__(None, None, None)


def test_missing_default_adapter_is_fatal(tiny_llama_dir: Path, root: Path) -> None:
    fatal: list[str] = []
    application = create_app(
        make_settings(tiny_llama_dir, root, default_adapter="nowhere"), on_fatal=fatal.append
    )
    with TestClient(application):
        assert application.state.runtime.wait(60) == "failed"
    assert "nowhere" in fatal[0]


def test_shipped_adapter_is_the_default_for_the_default_base(
    tiny_llama_dir: Path,
    tiny_qwen2_dir: Path,
    root: Path,
    adapter_store: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(app.runtime, "DEFAULT_BASE_MODEL", str(tiny_llama_dir))
    shutil.copytree(adapter_store / "beta", root / "builtin" / "snli-smollm2")
    client = start_client(make_settings(tiny_llama_dir, root))
    try:
        listing = client.get("/adapters").json()
        assert listing["default"] == "snli-smollm2"
        assert listing["loaded"][0]["source"] == "builtin"
        assert "snli-smollm2" in listing["available"] and "alpha" in listing["available"]
    finally:
        client.__exit__(None, None, None)
    # Made for another base model: not used, the service starts on the bare base.
    shutil.rmtree(root / "builtin" / "snli-smollm2")
    qwen = load_base_model(str(tiny_qwen2_dir), device="cpu")
    make_adapter(qwen, root / "builtin" / "snli-smollm2", seed=5)
    shutil.rmtree(root / "data")
    client = start_client(make_settings(tiny_llama_dir, root))
    try:
        assert client.get("/adapters").json()["default"] == "base"
    finally:
        client.__exit__(None, None, None)


def test_base_model_loads_exactly_once(
    tiny_llama_dir: Path, root: Path, adapter_store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []

    def counting_load(name: str, **kwargs: Any) -> Any:
        calls.append(name)
        return load_base_model(name, **kwargs)

    monkeypatch.setattr(app.runtime, "load_base_model", counting_load)
    client = start_client(make_settings(tiny_llama_dir, root, default_adapter="alpha"))
    try:
        for name in ("beta", "gamma"):
            client.post("/adapters", json={"name": name})
        client.put("/adapters/default", json={"name": "beta"})
        client.delete("/adapters/alpha")
        shutil.rmtree(root / "adapters" / "gamma")
        shutil.copytree(adapter_store / "alpha-v2", root / "adapters" / "gamma")
        assert client.post("/adapters", json={"name": "gamma", "replace": True}).status_code == 200
        client.put("/adapters/default", json={"name": "base"})
        for name in ("beta", "gamma"):
            client.delete(f"/adapters/{name}")
        assert classify(client, PAIRS[0]).status_code == 200
    finally:
        client.__exit__(None, None, None)
    assert calls == [str(tiny_llama_dir)]
