"""The input corpus (``tests/reliability/corpus.py``) against ``POST /evaluate``, in process.

Rejected files: a 4xx in the one error shape whose message names the problem (and the row and
column where there is one); the service keeps serving; nothing reaches the jobs store (no job
row, no upload left behind). Accepted files: the report counts exactly the rows the case means
and its metrics equal those of scoring those rows directly, without the service.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from nli.evaluation import render_markdown
from nli.metrics import compute_metrics
from tests.app.conftest import Scores, error_of, fill_adapters_dir, start_client
from tests.app.helpers import make_settings
from tests.reliability.corpus import (
    FORMULAS,
    MAX_TEXT_CHARS,
    MAX_UPLOAD_BYTES,
    Accepted,
    Case,
    Rejected,
    Row,
    accepted_cases,
    corpus,
    rejected_cases,
)

ADAPTER = "alpha"
FORMULA_START = ("=", "+", "-", "@", "\t")


def test_the_corpus_covers_the_issue() -> None:
    cases = corpus()
    assert len(cases) >= 25
    assert len({case.id for case in cases}) == len(cases)
    rejected = {case.category for case in rejected_cases()}
    accepted = {case.category for case in accepted_cases()}
    assert rejected == {"structure", "values", "format", "size"}
    assert accepted == {"encoding", "csv", "values", "size"}


@pytest.fixture(scope="module")
def service(
    tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory, adapter_store: Path
) -> Iterator[tuple[TestClient, Path]]:
    root = tmp_path_factory.mktemp("corpus")
    fill_adapters_dir(adapter_store, root / "adapters", [ADAPTER])
    settings = make_settings(
        tiny_llama_dir, root, max_upload_bytes=MAX_UPLOAD_BYTES, max_text_chars=MAX_TEXT_CHARS
    )
    client = start_client(settings)
    assert client.post("/adapters", json={"name": ADAPTER}).status_code == 200
    try:
        yield client, settings.data_dir
    finally:
        client.__exit__(None, None, None)


def stored(data_dir: Path) -> tuple[list[tuple[str, str]], list[str]]:
    """Every job in the SQLite store (id, status) and every upload file on disk."""
    with sqlite3.connect(data_dir / "jobs.sqlite3") as db:
        jobs = sorted(db.execute("SELECT id, status FROM jobs").fetchall())
    return jobs, sorted(p.name for p in (data_dir / "uploads").iterdir())


def post(client: TestClient, case: Case, **fields: str) -> Any:
    return client.post("/evaluate", files={"file": (case.filename, case.content)}, data=fields)


def still_serving(client: TestClient) -> None:
    answer = client.post("/classify", json={"premise": "a dog", "hypothesis": "an animal"})
    assert answer.status_code == 200, answer.text


def expected_metrics(reference: Scores, rows: Sequence[Row], adapter: str | None) -> Any:
    """Metrics of scoring ``rows`` directly (sequentially, once per distinct pair)."""
    pairs = [(p, h) for p, h, _ in rows]
    distinct = sorted(set(pairs))
    probs = reference(distinct, adapter)
    # Batched and sequential scores differ by up to ~4e-4: a corpus text whose prediction is
    # closer than that to a tie could flip, so the corpus uses texts far from ties.
    top2 = np.sort(probs, axis=1)[:, -2:]
    margins = top2[:, 1] - top2[:, 0]
    assert margins.min() > 1e-3, f"pick other texts: {distinct[int(margins.argmin())]} is a tie"
    index = {pair: i for i, pair in enumerate(distinct)}
    predicted = probs.argmax(axis=1)[[index[pair] for pair in pairs]]
    gold = np.array([label for _, _, label in rows])
    return compute_metrics(gold, predicted)


def wait_for_job(client: TestClient, job_id: str, timeout: float = 180.0) -> list[dict[str, Any]]:
    """Poll a job to its end; every status seen, in order."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/evaluate/{job_id}").json()
        seen.append(job)
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return seen
        time.sleep(0.1)
    raise TimeoutError(job_id)


@pytest.mark.parametrize("case", rejected_cases(), ids=lambda case: case.id)
def test_rejected(service: tuple[TestClient, Path], case: Case) -> None:
    client, data_dir = service
    expect = case.expect
    assert isinstance(expect, Rejected)
    before = stored(data_dir)
    response = post(client, case, adapter=ADAPTER)
    assert response.status_code == expect.status, response.text[:500]
    error = error_of(response)
    assert error["type"] == expect.type
    for fragment in expect.says:
        assert fragment in error["message"], (fragment, error["message"])
    assert len(response.content) < 4096  # the offending input is never echoed back
    if any(re.match(r"row \d", fragment) for fragment in expect.says):
        assert error["details"]["row"] > 0
    still_serving(client)
    assert stored(data_dir) == before


@pytest.mark.parametrize("case", accepted_cases(), ids=lambda case: case.id)
def test_accepted(service: tuple[TestClient, Path], reference: Scores, case: Case) -> None:
    client, data_dir = service
    expect = case.expect
    assert isinstance(expect, Accepted)
    big = len(expect.rows) > 1000
    # Small files: scored with the adapter and compared with the base, so that texts are echoed.
    fields = {} if big else {"adapter": ADAPTER, "compare_base": "true"}
    if expect.as_job:
        fields["async"] = "true"
    response = post(client, case, **fields)
    if expect.as_job:
        assert response.status_code == 202, response.text[:500]
        history = wait_for_job(client, response.json()["job_id"])
        job = history[-1]
        assert job["status"] == "succeeded", job
        assert job["progress"] == {
            "done": job["progress"]["total"],
            "total": job["progress"]["total"],
        }
        report = job["result"]
    else:
        assert response.status_code == 200, response.text[:500]
        history = []
        report = response.json()
    assert report["n"] == len(expect.rows)
    assert report["dropped"] == expect.dropped
    adapter = None if big else ADAPTER
    assert report["metrics"] == expected_metrics(reference, expect.rows, adapter)
    if not big:
        assert report["base"]["metrics"] == expected_metrics(reference, expect.rows, None)
        texts = {(p, h) for p, h, _ in expect.rows}
        echoed = [ex for case_ in report["cases"].values() for ex in case_["examples"]]
        for example in echoed:
            assert (example["premise"], example["hypothesis"]) in texts, example
    if case.notes.get("echoed"):
        check_formulas_stay_text(report, data_dir, job_id=history[-1]["job_id"])
    if big:
        check_progress(history, total=len(expect.rows))
    still_serving(client)


def check_formulas_stay_text(report: dict[str, Any], data_dir: Path, *, job_id: str) -> None:
    """Formula-like cells: stored and echoed verbatim as text; the Markdown export escapes them."""
    echoed = {ex["premise"] for ex in report["cases"]["both_wrong"]["examples"]}
    assert {p for p, _ in FORMULAS} <= echoed  # verbatim, never evaluated
    with sqlite3.connect(data_dir / "jobs.sqlite3") as db:
        (stored_result,) = db.execute("SELECT result FROM jobs WHERE id=?", (job_id,)).fetchone()
    assert '"=1+1"' in stored_result  # stored as the JSON string it was
    markdown = render_markdown(report)
    cells = [
        cell.strip()
        for line in markdown.splitlines()
        if line.startswith("| ") and not line.startswith("|---")
        for cell in line.strip("|").split(" | ")
    ]
    assert "'=1+1" in cells
    assert not [cell for cell in cells if cell.startswith(FORMULA_START)]


def check_progress(history: list[dict[str, Any]], *, total: int) -> None:
    """The job reported its progress while it ran, never going backwards."""
    done = [job["progress"]["done"] for job in history]
    assert done == sorted(done)
    assert any(0 < d < total for d in done), done
    assert all(job["progress"]["total"] == total for job in history if job["status"] != "queued")
