"""POST /evaluate: synchronous reports equal to nli.evaluation's, jobs, cancellation, limits,
bad files, and jobs that survive a restart."""

from __future__ import annotations

import io
import itertools
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from app.jobs import INTERRUPTED, JobStore
from nli.data import read_nli_file
from nli.evaluation import evaluate_dataset
from nli.labels import LABELS
from tests.app.conftest import PAIRS, Scores, error_of, start_client
from tests.app.helpers import make_settings, stream_request

TIMING = ("pairs_per_s", "seconds")


def rows(n: int) -> list[dict[str, Any]]:
    return [
        {"premise": PAIRS[i % len(PAIRS)][0], "hypothesis": PAIRS[i % len(PAIRS)][1],
         "label": LABELS[i % 3]}
        for i in range(n)
    ]  # fmt: skip


def as_file(records: list[dict[str, Any]], suffix: str) -> bytes:
    frame = pd.DataFrame(records)
    if suffix == ".jsonl":
        return "".join(json.dumps(r) + "\n" for r in records).encode()
    if suffix == ".csv":
        return frame.to_csv(index=False).encode()
    if suffix == ".tsv":
        return frame.to_csv(index=False, sep="\t").encode()
    buffer = io.BytesIO()
    frame.to_parquet(buffer)
    return buffer.getvalue()


def post(client: TestClient, content: bytes, name: str = "data.jsonl", **fields: Any) -> Any:
    data = {k: str(v).lower() if isinstance(v, bool) else v for k, v in fields.items()}
    return client.post("/evaluate", files={"file": (name, content)}, data=data)


def without_timing(report: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in report.items() if k not in TIMING}


def wait_for_job(client: TestClient, job_id: str, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/evaluate/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return dict(job)
        time.sleep(0.05)
    raise TimeoutError(job_id)


def expected_report(
    tmp_path: Path, content: bytes, name: str, reference: Scores, adapter: str, compare: bool
) -> dict[str, Any]:
    path = tmp_path / name
    path.write_bytes(content)
    data = read_nli_file(path)
    report = evaluate_dataset(
        data,
        lambda pairs, name: reference(pairs, name),
        adapter=adapter,
        base_model=str(read_base(tmp_path)),
        compare_base=compare,
    )
    return without_timing(report)


def read_base(tmp_path: Path) -> str:
    return (tmp_path / "base-model").read_text()


@pytest.fixture()
def jobs_root(tmp_path: Path, tiny_llama_dir: Path) -> Path:
    (tmp_path / "base-model").write_text(str(tiny_llama_dir))
    return tmp_path


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".tsv", ".parquet"])
def test_sync_report_equals_the_offline_evaluation(
    client: TestClient, jobs_root: Path, reference: Scores, suffix: str
) -> None:
    client.post("/adapters", json={"name": "alpha"})
    content = as_file(rows(12), suffix)
    response = post(client, content, f"dev{suffix}", adapter="alpha", compare_base=True)
    assert response.status_code == 200, response.text
    report = response.json()
    assert report["adapter"] == "alpha" and report["source"] == f"dev{suffix}"
    assert report["base"] is not None and report["cases"] is not None
    expected = expected_report(jobs_root, content, f"dev{suffix}", reference, "alpha", True)
    assert without_timing(report).keys() == expected.keys()
    for key in ("n", "dropped", "adapter", "base_model", "source"):
        assert report[key] == expected[key]
    # Same predictions (the probabilities agree to ~1e-3, far from any decision boundary here).
    assert report["metrics"]["confusion_matrix"] == expected["metrics"]["confusion_matrix"]
    assert report["base"] == expected["base"]


def test_bad_files_are_400_naming_row_and_column_and_store_nothing(
    client: TestClient, service_root: Path
) -> None:
    good = rows(3)
    bad = [*good, {"premise": "a man", "hypothesis": "", "label": "neutral"}]
    response = post(client, as_file(bad, ".jsonl"))
    assert response.status_code == 400
    error = error_of(response)
    assert error["type"] == "invalid_data"
    assert "row 4" in error["message"] and "hypothesis" in error["message"]
    unknown_label = [*good, {"premise": "a", "hypothesis": "b", "label": "maybe"}]
    assert "row 4" in error_of(post(client, as_file(unknown_label, ".csv"), "x.csv"))["message"]
    assert post(client, b"", "empty.jsonl").status_code == 400
    assert post(client, b"\x00\x01\x02garbage", "binary.parquet").status_code == 400
    unsupported = post(client, b"premise,hypothesis,label\n", "data.xlsx")
    assert unsupported.status_code == 415
    assert error_of(unsupported)["type"] == "unsupported_file_type"
    assert post(client, b"x", "no-suffix").status_code == 415
    with sqlite3.connect(service_root / "data" / "jobs.sqlite3") as db:
        assert db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 0
    assert list((service_root / "data" / "uploads").iterdir()) == []


def test_unknown_adapter_is_404_and_missing_file_422(client: TestClient) -> None:
    response = post(client, as_file(rows(3), ".jsonl"), adapter="nope")
    assert response.status_code == 404
    assert client.post("/evaluate", data={"adapter": "base"}).status_code == 422


def test_async_job_gives_the_same_report(client: TestClient) -> None:
    content = as_file(rows(20), ".jsonl")
    sync = post(client, content, adapter="base").json()
    accepted = post(client, content, adapter="base", **{"async": True})
    assert accepted.status_code == 202
    job_id = accepted.json()["job_id"]
    job = wait_for_job(client, job_id)
    assert job["status"] == "succeeded", job
    assert job["progress"] == {"done": 20, "total": 20}
    assert job["error"] is None and job["finished_at"] is not None
    assert without_timing(job["result"]) == without_timing(sync)
    assert error_of(client.delete(f"/evaluate/{job_id}"))["type"] == "job_conflict"


def test_unknown_job_is_404(client: TestClient) -> None:
    for method in ("GET", "DELETE"):
        response = client.request(method, "/evaluate/0123456789abcdef")
        assert response.status_code == 404
        assert error_of(response)["type"] == "job_not_found"


@pytest.fixture()
def small_limits(tiny_llama_dir: Path, tmp_path: Path) -> Iterator[TestClient]:
    settings = make_settings(tiny_llama_dir, tmp_path, max_upload_bytes=4000, eval_sync_max_rows=5)
    client = start_client(settings)
    try:
        yield client
    finally:
        client.__exit__(None, None, None)


def test_upload_limits_are_413_before_the_whole_body_is_read(small_limits: TestClient) -> None:
    over = post(small_limits, b'{"premise": "a", "hypothesis": "b", "label": 0}\n' * 200)
    assert over.status_code == 413
    assert error_of(over)["type"] == "payload_too_large"
    head = b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n'
    endless = itertools.chain([head], itertools.repeat(b"x" * 65536, 10_000))  # 640 MB
    status, pulled = stream_request(
        small_limits, "/evaluate", content_type="multipart/form-data; boundary=b", chunks=endless
    )
    assert status == 413
    assert pulled < 10  # 4 KB + 64 KB of envelope allowance: stopped at the second chunk
    assert small_limits.get("/health").status_code == 200


def test_more_rows_than_the_sync_limit_become_a_job(small_limits: TestClient) -> None:
    accepted = post(small_limits, as_file(rows(8), ".jsonl"))
    assert accepted.status_code == 202
    assert wait_for_job(small_limits, accepted.json()["job_id"])["status"] == "succeeded"


def test_cancel_a_queued_and_a_running_job(small_limits: TestClient) -> None:
    engine = small_limits.app.state.runtime.require_ready().engine  # type: ignore[attr-defined]
    gate = threading.Event()
    blocker = engine.run_exclusive(lambda: gate.wait(30))
    first = post(small_limits, as_file(rows(30), ".jsonl")).json()["job_id"]
    second = post(small_limits, as_file(rows(30), ".jsonl")).json()["job_id"]
    deadline = time.monotonic() + 10
    while small_limits.get(f"/evaluate/{first}").json()["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert small_limits.get(f"/evaluate/{second}").json()["status"] == "queued"
    assert small_limits.delete(f"/evaluate/{second}").json()["status"] == "cancelled"
    assert small_limits.delete(f"/evaluate/{first}").json()["status"] == "cancelled"
    gate.set()
    blocker.result(10)
    assert wait_for_job(small_limits, first)["status"] == "cancelled"
    assert small_limits.delete(f"/evaluate/{second}").json()["status"] == "cancelled"  # no-op
    third = post(small_limits, as_file(rows(8), ".jsonl")).json()["job_id"]
    assert wait_for_job(small_limits, third)["status"] == "succeeded"


def test_jobs_survive_a_restart(tiny_llama_dir: Path, tmp_path: Path) -> None:
    settings = make_settings(tiny_llama_dir, tmp_path)
    client = start_client(settings)
    try:
        done_id = post(client, as_file(rows(10), ".jsonl"), **{"async": True}).json()["job_id"]
        finished = wait_for_job(client, done_id)
        assert finished["status"] == "succeeded"
    finally:
        client.__exit__(None, None, None)
    # While the server is down: one job left queued, one cut off while running.
    store = JobStore(settings.data_dir)
    queued_upload = store.new_upload_path(".jsonl")
    queued_upload.write_bytes(as_file(rows(7), ".jsonl"))
    queued = store.create(
        adapter="base", compare_base=False, source="q.jsonl", upload=queued_upload, total=7
    )
    running_upload = store.new_upload_path(".jsonl")
    running_upload.write_bytes(as_file(rows(7), ".jsonl"))
    running = store.create(
        adapter="base", compare_base=False, source="r.jsonl", upload=running_upload, total=7
    )
    assert store.start(running.id)
    store.close()
    client = start_client(settings)
    try:
        again = client.get(f"/evaluate/{done_id}").json()
        assert again["status"] == "succeeded" and again["result"] == finished["result"]
        cut_off = client.get(f"/evaluate/{running.id}").json()
        assert cut_off["status"] == "failed"
        assert cut_off["error"] == {"type": "interrupted", "message": INTERRUPTED}
        assert not running_upload.exists()
        resumed = wait_for_job(client, queued.id)
        assert resumed["status"] == "succeeded" and resumed["result"]["n"] == 7
        # The worker deletes the upload just after it records the result: wait, do not race it.
        deadline = time.monotonic() + 10
        while queued_upload.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not queued_upload.exists()
    finally:
        client.__exit__(None, None, None)


def test_one_server_per_data_dir(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from nli.errors import ConfigError

    store = JobStore(tmp_path / "data")
    try:
        with pytest.raises(ConfigError, match="another server"):
            JobStore(tmp_path / "data")
    finally:
        store.close()
    JobStore(tmp_path / "data").close()  # free again


def test_probabilities_in_reports_are_plain_json(client: TestClient) -> None:
    report = post(client, as_file(rows(4), ".jsonl"), adapter="base").json()
    assert isinstance(report["metrics"]["accuracy"], float)
    assert np.isfinite(report["metrics"]["macro_f1"])
