"""The real server (``python -m app.cli``, uvicorn on 127.0.0.1): concurrency while adapters are
loaded, unloaded and switched; SIGTERM; kill -9 during a job; start-up failures."""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.jobs import INTERRUPTED, SHUTDOWN
from nli.labels import LABELS
from tests.app.conftest import PAIRS, Scores, fill_adapters_dir
from tests.app.helpers import free_port, server_env, start_server, stop_server, wait_ready

KEY = "server-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
TOL = 1e-4  # the same pair scored alone or in any batch agrees far closer than this
CLIENTS = 32
REQUESTS_PER_CLIENT = 20


class Server:
    def __init__(self, root: Path, base_dir: Path, **settings: Any) -> None:
        self.root = root
        self.env = server_env(
            base_model=base_dir,
            device="cpu",
            adapters_dir=root / "adapters",
            builtin_adapters_dir=root / "builtin",
            data_dir=root / "data",
            cache_dir=root / "cache",
            api_key=KEY,
            **settings,
        )
        # One intra-op thread: the test's own client threads share the 2 cores, and OpenMP
        # barriers on an oversubscribed CPU make every small op wait for a time slice.
        self.env["OMP_NUM_THREADS"] = "1"
        self.log = root / "server.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, *, ready: bool = True) -> Server:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.process = start_server(self.env, port=port, log=self.log)
        if ready:
            wait_ready(self.url, process=self.process)
        return self

    def stop(self) -> int:
        assert self.process is not None
        return stop_server(self.process)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(30)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture()
def root(tmp_path: Path, adapter_store: Path) -> Path:
    fill_adapters_dir(adapter_store, tmp_path / "adapters")
    return tmp_path


@pytest.fixture()
def server(root: Path, tiny_llama_dir: Path) -> Iterator[Server]:
    running = Server(root, tiny_llama_dir, default_adapter="alpha", max_batch_wait_ms=2).start()
    try:
        yield running
    finally:
        running.stop()


def jsonl(n: int) -> bytes:
    return "".join(
        json.dumps({"premise": p, "hypothesis": h, "label": LABELS[i % 3]}) + "\n"
        for i, (p, h) in enumerate(PAIRS[i % len(PAIRS)] for i in range(n))
    ).encode()


def wait_until_handled(url: str, route: str, count: int, timeout: float = 60.0) -> None:
    """Poll ``/metrics`` until ``count`` requests have reached the app: in flight now (the only
    requests but the scrape itself) or already answered on ``route``."""
    deadline = time.monotonic() + timeout
    while True:
        in_flight = answered = 0.0
        for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
            for sample in family.samples:
                if sample.name == "nli_http_requests_in_flight":
                    in_flight += sample.value - 1  # less this scrape
                elif sample.name == "nli_http_requests_total" and sample.labels["route"] == route:
                    answered += sample.value
        if in_flight + answered >= count:
            return
        assert time.monotonic() < deadline, f"{in_flight + answered:g} of {count} requests came"
        time.sleep(0.01)


def probs(body: dict[str, Any]) -> np.ndarray:
    return np.array([s["score"] for s in body["scores"]])


def test_32_clients_while_adapters_are_loaded_unloaded_and_switched(
    server: Server, root: Path, adapter_store: Path, reference: Scores
) -> None:
    """Every answer equals the sequential score of its pair with the adapter it names; no
    request fails (404 only for an adapter that is unloaded at that moment)."""
    expected = {
        name: reference(PAIRS, name) for name in ("base", "alpha", "beta", "gamma", "alpha-v2")
    }
    versions = {"delta": ("alpha", "alpha-v2")}  # delta is replaced back and forth under load
    shutil.copytree(adapter_store / "alpha", root / "adapters" / "delta")
    admin = httpx.Client(base_url=server.url, headers=AUTH, timeout=60)
    for name in ("beta", "delta"):
        assert admin.post("/adapters", json={"name": name}).status_code == 200
    stop = threading.Event()
    operations: list[str] = []

    def churn() -> None:
        i = 0
        while not stop.is_set():
            source = versions["delta"][i % 2]
            shutil.rmtree(root / "adapters" / "delta")
            shutil.copytree(adapter_store / source, root / "adapters" / "delta")
            steps = [
                ("POST", "/adapters", {"name": "gamma"}),
                ("PUT", "/adapters/default", {"name": "gamma"}),
                ("POST", "/adapters", {"name": "delta", "replace": True}),
                ("PUT", "/adapters/default", {"name": "beta"}),
                ("DELETE", "/adapters/gamma", None),
                ("PUT", "/adapters/default", {"name": "base"}),
                ("PUT", "/adapters/default", {"name": "alpha"}),
            ]
            for method, path, body in steps:
                response = admin.request(method, path, json=body)
                assert response.status_code == 200, (method, path, response.text)
                operations.append(f"{method} {path}")
            i += 1

    def client_run(seed: int) -> list[str]:
        rng = random.Random(seed)
        problems: list[str] = []
        with httpx.Client(base_url=server.url, timeout=60) as http:
            for _ in range(REQUESTS_PER_CLIENT):
                index = rng.randrange(len(PAIRS))
                adapter = rng.choice([None, "base", "alpha", "beta", "gamma", "delta"])
                body: dict[str, Any] = {"premise": PAIRS[index][0], "hypothesis": PAIRS[index][1]}
                if adapter is not None:
                    body["adapter"] = adapter
                response = http.post("/classify", json=body)
                if response.status_code == 404 and adapter == "gamma":
                    continue  # unloaded at that moment: a correct answer
                if response.status_code != 200:
                    problems.append(f"{adapter}: {response.status_code} {response.text}")
                    continue
                answer = response.json()
                used = answer["adapter"]
                if adapter is not None and used != adapter:
                    problems.append(f"asked for {adapter}, answered by {used}")
                candidates = versions.get(used, (used,))
                if not any(
                    np.abs(probs(answer) - expected[c][index]).max() < TOL for c in candidates
                ):
                    problems.append(f"{used} on pair {index}: {probs(answer)} is not its score")
        return problems

    churner = threading.Thread(target=churn)
    churner.start()
    try:
        with ThreadPoolExecutor(CLIENTS) as pool:
            problems = [p for result in pool.map(client_run, range(CLIENTS)) for p in result]
    finally:
        stop.set()
        churner.join(60)
    assert problems == [], "\n".join(problems)
    assert len(operations) >= 7, "the adapters did not change during the load"
    # The metrics saw batches of several requests.
    metrics = httpx.get(f"{server.url}/metrics").text
    assert "nli_batch_requests_count" in metrics


def test_sigterm_finishes_in_flight_requests_and_marks_the_running_job(
    root: Path, tiny_llama_dir: Path
) -> None:
    server = Server(root, tiny_llama_dir, eval_sync_max_rows=0).start()
    http = httpx.Client(base_url=server.url, timeout=60)
    try:
        job = http.post("/evaluate", files={"file": ("big.jsonl", jsonl(60_000))}).json()
        deadline = time.monotonic() + 60
        while http.get(f"/evaluate/{job['job_id']}").json()["status"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # 1,020 pairs each: one worker scores the four in turn, ~0.2 s apiece on an idle CPU, so
        # most are still in flight when uvicorn notices the signal (it looks every 0.1 s).
        batch = {"pairs": [{"premise": p, "hypothesis": h} for p, h in PAIRS] * 170}
        with ThreadPoolExecutor(4) as pool:
            in_flight = [pool.submit(http.post, "/classify/batch", json=batch) for _ in range(4)]
            # Signal only once the app has all four: uvicorn rightly closes, on SIGTERM, a
            # connection whose request it has not read yet (the client sees a reset), and on a
            # busy machine a fixed sleep sometimes sent the signal before that.
            wait_until_handled(server.url, "/classify/batch", 4)
            assert server.process is not None
            server.process.send_signal(signal.SIGTERM)
            answers = [future.result(60) for future in in_flight]
        assert [a.status_code for a in answers] == [200] * 4
        assert server.process.wait(60) == 0
        # Not vacuous: the shutdown began while the app was still handling a request.
        during_shutdown = server.output().split("Shutting down", 1)[1]
        assert "POST /classify/batch 200" in during_shutdown
    finally:
        server.stop()
    server.start()
    try:
        stopped = httpx.get(f"{server.url}/evaluate/{job['job_id']}").json()
        assert stopped["status"] == "failed"
        assert stopped["error"]["message"] == SHUTDOWN
    finally:
        server.stop()


def test_a_job_cut_off_by_kill_9_fails_with_its_reason_and_new_jobs_run(
    root: Path, tiny_llama_dir: Path
) -> None:
    server = Server(root, tiny_llama_dir).start()
    try:
        url = f"{server.url}/evaluate"
        files = {"file": ("big.jsonl", jsonl(60_000))}
        job_id = httpx.post(url, files=files, timeout=60).json()["job_id"]
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/{job_id}").json()["progress"]["done"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        server.kill()
    finally:
        server.stop()
    server.start()
    try:
        job = httpx.get(f"{server.url}/evaluate/{job_id}").json()
        assert job["status"] == "failed"
        assert job["error"] == {"type": "interrupted", "message": INTERRUPTED}
        files = {"file": ("small.jsonl", jsonl(30))}
        new = httpx.post(f"{server.url}/evaluate", files=files, data={"async": "true"}).json()
        deadline = time.monotonic() + 60
        while (status := httpx.get(f"{server.url}/evaluate/{new['job_id']}").json())["status"] in (
            "queued",
            "running",
        ):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert status["status"] == "succeeded", status
    finally:
        server.stop()


def test_a_base_model_that_cannot_load_ends_the_process_non_zero(root: Path) -> None:
    server = Server(root, root / "no-such-model").start(ready=False)
    assert server.process is not None
    try:
        code = server.process.wait(120)
    finally:
        server.stop()
    assert code == 1
    log = server.output()
    assert "could not start" in log and "no-such-model" in log


def test_bad_settings_end_the_process_with_a_clear_message(
    root: Path, tiny_llama_dir: Path
) -> None:
    server = Server(root, tiny_llama_dir, max_batch_size=0).start(ready=False)
    assert server.process is not None
    try:
        code = server.process.wait(120)
    finally:
        server.stop()
    assert code == 2
    assert "NLI_MAX_BATCH_SIZE" in server.output()
