"""Fuzzing with schemathesis against the app's own OpenAPI schema, in process (ASGI), on the
tiny model: every operation, positive and negative data, no 5xx and no response that breaks the
schema (status codes, content types, headers and bodies are all checked by schemathesis).

The run is reproducible: Hypothesis is derandomized, keeps no example database and draws a
fixed number of examples per operation and mode; the test counts what it sent.
"""

from __future__ import annotations

import copy
import json
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.config import SchemathesisConfig
from schemathesis.python import asgi

from app.main import create_app
from app.settings import ADAPTER_NAME_PATTERN
from tests.app.conftest import PAIRS, fill_adapters_dir
from tests.app.helpers import make_settings

KEY = "fuzz-key"
EXAMPLES = 80  # per operation and generation mode
VARIANT_EXAMPLES = 40
MIN_REQUESTS = 1000
POSITIVE = GenerationMode.POSITIVE
MODES = (POSITIVE, GenerationMode.NEGATIVE)
# Operations that name adapters, fuzzed again with names of adapters that exist.
NAMED_OPERATIONS = (
    "POST /adapters",
    "PUT /adapters/default",
    "DELETE /adapters/{name}",
    "POST /classify",
    "POST /classify/batch",
)
# Operations whose every input is unconstrained (no parameters at all, or a free-form job id):
# there is nothing to make invalid, so negative generation is unsatisfiable for them.
NOTHING_TO_NEGATE = {
    "GET /health",
    "GET /ready",
    "GET /metrics",
    "GET /adapters",
    "GET /evaluate/{job_id}",
    "DELETE /evaluate/{job_id}",
}
# A schema-valid upload may still be refused: its validity depends on the file name (415 for an
# unsupported suffix) and on its contents (400 naming row and column), and OpenAPI can constrain
# neither. Everything else about positive data must be accepted (or 404/409, schemathesis's
# defaults for data that names something absent or conflicting).
CONFIG = {
    "operations": [
        {
            "include-name": "POST /evaluate",  # (include-path and include-method are OR'ed)
            "checks": {
                "positive_data_acceptance": {
                    "expected-statuses": ["2xx", "400", "404", "409", "415"]
                }
            },
        }
    ]
}
SETTINGS = hypothesis.settings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)


@dataclass
class Tally:
    """What a fuzz run sent and what came back."""

    requests: int = 0
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    failures: dict[tuple[str, str, int, str], str] = field(default_factory=dict)
    unsatisfiable: set[str] = field(default_factory=set)

    def operations(self) -> set[str]:
        return {label for label, _ in self.statuses}

    def server_errors(self) -> dict[tuple[str, int], int]:
        return {key: n for key, n in self.statuses.items() if key[1] >= 500}

    def report(self) -> str:
        return "\n\n".join(
            f"{label} [{mode}] -> {status}: {title}\n{detail}"
            for (label, mode, status, title), detail in self.failures.items()
        )


def fuzz(
    operation: Any,
    tally: Tally,
    *,
    mode: GenerationMode,
    examples: int = EXAMPLES,
    headers: dict[str, str] | None = None,
) -> None:
    """Send ``examples`` generated requests to one operation and validate every response."""

    @hypothesis.settings(SETTINGS, max_examples=examples)
    @given(case=operation.as_strategy(mode))
    def run(case: Any) -> None:
        tally.requests += 1
        try:
            response = case.call(headers=headers)
        except Exception as exc:  # the app raised through the ASGI boundary: a bug
            key = (operation.label, mode.value, 0, f"{type(exc).__name__}: {exc}")
            tally.failures.setdefault(key, case.as_curl_command())
            return
        tally.statuses[(operation.label, response.status_code)] += 1
        try:
            case.validate_response(response, headers=headers)
        except BaseExceptionGroup as failures:  # schemathesis.FailureGroup
            title = str(failures).splitlines()[0]
            key = (operation.label, mode.value, response.status_code, title)
            tally.failures.setdefault(key, str(failures)[:3000])

    try:
        run()
    except Unsatisfiable:
        tally.unsatisfiable.add(f"{operation.label} [{mode.value}]")


def operations_of(schema: Any) -> list[Any]:
    return [result.ok() for result in schema.get_all_operations()]


def start(app: FastAPI) -> Any:
    """Load the schema through the ASGI app (schemathesis runs the lifespan) and wait for the
    model, so that no request meets a 503 while it loads."""
    config = SchemathesisConfig.from_dict(CONFIG)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=config)
    assert app.state.runtime.wait(120) == "ready", app.state.runtime.error
    return schema


def variant(schema: Any, app: FastAPI, edit: Callable[[dict[str, Any]], None]) -> Any:
    """The app's schema changed by ``edit``, to steer generation where random data rarely goes.

    The responses it declares are untouched, so every answer is still checked against them.
    """
    raw = copy.deepcopy(schema.raw_schema)
    edit(raw)
    steered = schemathesis.openapi.from_dict(raw, config=SchemathesisConfig.from_dict(CONFIG))
    steered.app = app
    return steered


def upload_named(filename: str) -> Callable[[dict[str, Any]], None]:
    """Declare the upload's file name and drop the ``adapter`` field.

    schemathesis names a file part after its field ("file"), which the service refuses with 415
    before reading it; a data file's name sends the generated bytes to the readers, and without
    an adapter name they are not stopped by a 404 first.
    """

    def edit(raw: dict[str, Any]) -> None:
        media = raw["paths"]["/evaluate"]["post"]["requestBody"]["content"]["multipart/form-data"]
        disposition = f'form-data; name="file"; filename="{filename}"'
        header = {"schema": {"type": "string", "example": disposition}}
        media["encoding"] = {"file": {"headers": {"Content-Disposition": header}}}
        ref = media["schema"]["$ref"].rsplit("/", 1)[-1]
        raw["components"]["schemas"][ref]["properties"].pop("adapter")

    return edit


def names_from(names: Sequence[str]) -> Callable[[dict[str, Any]], None]:
    """Adapter names drawn from ``names`` (random ones are never in the adapters dir), so that
    adapters are really loaded, replaced, unloaded, made default and used, in random order."""

    def edit(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("pattern") == ADAPTER_NAME_PATTERN:
                node.pop("pattern")
                node.pop("examples", None)
                node["enum"] = list(names)
            for value in node.values():
                edit(value)
        elif isinstance(node, list):
            for value in node:
                edit(value)

    return edit


def jobs_from(job_ids: Sequence[str]) -> Callable[[dict[str, Any]], None]:
    """Job ids drawn from existing jobs, so that job answers (and their reports) are checked."""

    def edit(raw: dict[str, Any]) -> None:
        for operation in raw["paths"]["/evaluate/{job_id}"].values():
            for parameter in operation["parameters"]:
                if parameter["name"] == "job_id":
                    parameter["schema"] = {"type": "string", "enum": list(job_ids)}

    return edit


def finished_job(app: FastAPI) -> str:
    """Run a small evaluation job to its end (the app's lifespan is already running)."""
    client = TestClient(app)  # not entered: the lifespan is schemathesis's
    rows = "".join(
        json.dumps({"premise": p, "hypothesis": h, "label": i % 3}) + "\n"
        for i, (p, h) in enumerate(PAIRS)
    )
    accepted = client.post(
        "/evaluate", files={"file": ("dev.jsonl", rows.encode())}, data={"async": "true"}
    )
    assert accepted.status_code == 202, accepted.text
    job_id = str(accepted.json()["job_id"])
    deadline = time.monotonic() + 60
    while client.get(f"/evaluate/{job_id}").json()["status"] != "succeeded":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return job_id


@pytest.fixture(scope="module")
def service(
    tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory, adapter_store: Path
) -> Iterator[tuple[FastAPI, FastAPI]]:
    """Two services: admin routes open (no key), and admin routes behind a key."""
    apps = []
    for api_key in (None, KEY):
        root = tmp_path_factory.mktemp("fuzz")
        fill_adapters_dir(adapter_store, root / "adapters")
        apps.append(create_app(make_settings(tiny_llama_dir, root, api_key=api_key)))
    try:
        yield apps[0], apps[1]
    finally:
        asgi.shutdown_lifespans()  # the lifespans schemathesis started: stop jobs, free the model


def assert_clean(tally: Tally, expected_operations: Iterable[str]) -> None:
    if tally.failures:
        pytest.fail(tally.report(), pytrace=False)
    assert tally.server_errors() == {}
    assert set(expected_operations) <= tally.operations()


def test_every_operation_without_a_key(service: tuple[FastAPI, FastAPI]) -> None:
    """Every operation, positive and negative data: >= 1,000 requests, all answered within the
    schema. Uploads are also sent as .jsonl, .csv and .parquet files so the readers are fuzzed."""
    app, _ = service
    schema = start(app)
    tally = Tally()
    operations = operations_of(schema)
    assert len(operations) >= 11  # classify x2, evaluate x3, adapters x4, health, ready, metrics
    for operation in operations:
        for mode in MODES:
            fuzz(operation, tally, mode=mode)
    for filename in ("data.jsonl", "data.csv", "data.parquet"):
        upload = variant(schema, app, upload_named(filename))["/evaluate"]["POST"]
        for mode in MODES:
            fuzz(upload, tally, mode=mode, examples=VARIANT_EXAMPLES)
    named = variant(schema, app, names_from(["alpha", "beta", "gamma", "base", "missing"]))
    for label in NAMED_OPERATIONS:
        fuzz(named.find_operation_by_label(label), tally, mode=POSITIVE, examples=VARIANT_EXAMPLES)
    jobs = variant(schema, app, jobs_from([finished_job(app), "0" * 32]))
    for label in ("GET /evaluate/{job_id}", "DELETE /evaluate/{job_id}"):
        fuzz(jobs.find_operation_by_label(label), tally, mode=POSITIVE, examples=10)
    print(f"fuzzed {tally.requests} requests; statuses: {sorted(tally.statuses.items())}")
    assert_clean(tally, [op.label for op in operations])
    assert tally.unsatisfiable == {f"{label} [negative]" for label in NOTHING_TO_NEGATE}
    assert tally.requests >= MIN_REQUESTS
    # The fuzz reached the model and the file readers, not only the validation layer.
    assert tally.statuses[("POST /classify", 200)] > 0
    assert tally.statuses[("POST /classify/batch", 200)] > 0
    assert tally.statuses[("POST /evaluate", 400)] > 0
    assert tally.statuses[("POST /adapters", 200)] > 0
    assert tally.statuses[("DELETE /adapters/{name}", 200)] > 0
    assert tally.statuses[("GET /evaluate/{job_id}", 200)] > 0
    # The service still answers.
    probe = TestClient(app).post("/classify", json={"premise": "a", "hypothesis": "b"})
    assert probe.status_code == 200


def test_admin_operations_with_a_key(service: tuple[FastAPI, FastAPI]) -> None:
    """With NLI_API_KEY set, admin operations declare 401/403 and answer them: fuzzed with the
    credentials schemathesis generates (wrong ones) and with the right key."""
    _, app = service
    schema = start(app)
    tally = Tally()
    admin = [
        op
        for op in operations_of(schema)
        if op.label in ("POST /adapters", "PUT /adapters/default", "DELETE /adapters/{name}")
    ]
    assert len(admin) == 3
    for operation in admin:
        for mode in MODES:
            fuzz(operation, tally, mode=mode, examples=VARIANT_EXAMPLES)
        fuzz(
            operation,
            tally,
            mode=POSITIVE,
            examples=VARIANT_EXAMPLES,
            headers={"Authorization": f"Bearer {KEY}"},
        )
    print(f"fuzzed {tally.requests} admin requests; statuses: {sorted(tally.statuses.items())}")
    assert_clean(tally, [op.label for op in admin])
    statuses = {status for _, status in tally.statuses}
    assert {401, 403} <= statuses  # refused without the key
    assert statuses & {404, 409}  # and, with it, the request reached the registry
