"""The soak scenario, shared by the CI test (tiny model) and the ``slow`` benchmark (default
model): a real server on 127.0.0.1, clients sending ``/classify`` while adapters are loaded,
unloaded, replaced and made default, and the server's RSS sampled along the way.

Every answer is checked against sequential reference scores of the adapter version it may have
been routed to: for each request, the versions (and defaults, and loaded states) that were in
force at some moment between sending it and receiving the answer, from a timeline of every
admin operation. A timeline is needed because a request and an operation that overlap may be
ordered either way; anything outside that window is a wrong answer.
"""

from __future__ import annotations

import bisect
import json
import random
import shutil
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

from tests.app.helpers import free_port, server_env, start_server, stop_server, wait_ready

KEY = "soak-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
ADAPTERS = ("alpha", "beta", "gamma", "delta")
# "delta" is replaced back and forth between the files of these two (by store name).
DELTA_VERSIONS = ("alpha", "alpha-v2")
CHOICES: tuple[str | None, ...] = (None, "base", *ADAPTERS)


class Timeline:
    """Values something took over time, where each change happened at an unknown moment
    between the start and the end of the call that made it."""

    def __init__(self, initial: Hashable) -> None:
        self.initial = initial
        self.changes: list[tuple[float, float, Hashable]] = []  # (began, ended, value), in order

    def change(self, began: float, ended: float, value: Hashable) -> None:
        self.changes.append((began, ended, value))

    def possible(self, began: float, ended: float) -> set[Hashable]:
        """Every value in force at some moment of [began, ended]."""
        ends = [end for _, end, _ in self.changes]
        settled = bisect.bisect_left(ends, began)  # changes finished before ``began``
        values = {self.changes[settled - 1][2] if settled else self.initial}
        values.update(v for start, end, v in self.changes if start < ended and end > began)
        return values


@dataclass
class Answer:
    index: int
    pair: int
    asked: str | None
    began: float
    ended: float
    status: int
    answered: str | None = None
    probs: np.ndarray | None = None
    body: str = ""


@dataclass
class SoakResult:
    answers: list[Answer]
    operations: list[str]
    rss: dict[int, int]  # completed requests -> server RSS in bytes
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    operation_times: list[float] = field(default_factory=list)  # when each operation began

    @property
    def operations_during_load(self) -> int:
        """Operations that began before the last answer came back."""
        last = max(a.ended for a in self.answers)
        return sum(1 for began in self.operation_times if began < last)

    def statuses(self) -> Counter[int]:
        return Counter(a.status for a in self.answers)

    def summary(self) -> dict[str, Any]:
        latencies = np.array([a.ended - a.began for a in self.answers])
        first, last = min(self.rss), max(self.rss)
        return {
            "requests": len(self.answers),
            "admin_operations": len(self.operations),
            "admin_operations_during_load": self.operations_during_load,
            "statuses": {str(k): v for k, v in sorted(self.statuses().items())},
            "wrong_answers": len(self.problems),
            "seconds": round(self.seconds, 2),
            "requests_per_s": round(len(self.answers) / self.seconds, 1),
            "latency_ms": {
                f"p{q}": round(float(np.percentile(latencies, q)) * 1000, 1) for q in (50, 90, 99)
            },
            "rss_mib": {str(k): round(v / 2**20, 1) for k, v in sorted(self.rss.items())},
            "rss_growth_from_request_1000": round(self.rss[last] / self.rss[first] - 1, 4),
        }


class SoakServer:
    """``nli-serve`` on 127.0.0.1 with an API key, its adapters dir under ``root``."""

    def __init__(self, root: Path, *, threads: int = 1, **settings: Any) -> None:
        self.root = root
        self.env = server_env(
            device="cpu",
            adapters_dir=root / "adapters",
            builtin_adapters_dir=root / "builtin",
            data_dir=root / "data",
            api_key=KEY,
            **settings,
        )
        # One intra-op thread, as the other server tests: the clients share the same cores.
        self.env["OMP_NUM_THREADS"] = str(threads)
        self.log = root / "server.log"
        self.url = ""
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> SoakServer:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.process = start_server(self.env, port=port, log=self.log, args=["--no-access-log"])
        wait_ready(self.url, process=self.process, timeout=600)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.process is not None
        stop_server(self.process)

    def rss(self) -> int:
        assert self.process is not None
        return int(psutil.Process(self.process.pid).memory_info().rss)


def run_soak(
    server: SoakServer,
    store: Path,
    expected: Mapping[str, np.ndarray],
    pairs: Sequence[tuple[str, str]],
    *,
    requests: int = 5000,
    clients: int = 32,
    admin_operations: int = 50,
    rss_from: int = 1000,
    tolerance: float = 1e-4,
) -> SoakResult:
    """Run the scenario against ``server`` (adapters already in its dir: see ``prepare``).

    ``expected[name]``: sequential scores of ``pairs`` for every adapter name in ``store`` and
    ``base``. Admin operations are spread evenly over the run: operation k starts once
    ``(k + 1) * requests / (admin_operations + 1)`` requests are answered.
    """
    adapters = server.root / "adapters"
    admin = httpx.Client(base_url=server.url, headers=AUTH, timeout=120)
    for name in ("beta", "delta"):
        assert admin.post("/adapters", json={"name": name}).status_code == 200
    defaults = Timeline("alpha")
    deltas = Timeline(DELTA_VERSIONS[0])
    gamma_loaded = Timeline(False)
    operations: list[str] = []
    operation_times: list[float] = []
    rss: dict[int, int] = {}
    done = 0
    next_index = 0
    lock = threading.Condition()
    answers: list[Answer] = []
    problems: list[str] = []

    def swap_delta() -> tuple[str, Any]:
        version = DELTA_VERSIONS[(len(deltas.changes) + 1) % 2]
        shutil.rmtree(adapters / "delta")
        shutil.copytree(store / version, adapters / "delta")
        return version, ("POST", "/adapters", {"name": "delta", "replace": True})

    plan: list[Callable[[], tuple[Any, Any]]] = [
        lambda: (("gamma", True), ("POST", "/adapters", {"name": "gamma"})),
        lambda: ("gamma", ("PUT", "/adapters/default", {"name": "gamma"})),
        swap_delta,
        lambda: ("beta", ("PUT", "/adapters/default", {"name": "beta"})),
        lambda: (("gamma", False), ("DELETE", "/adapters/gamma", None)),
        lambda: ("base", ("PUT", "/adapters/default", {"name": "base"})),
        lambda: ("alpha", ("PUT", "/adapters/default", {"name": "alpha"})),
    ]

    def churn() -> None:
        for k in range(admin_operations):
            threshold = (k + 1) * requests // (admin_operations + 1)
            with lock:
                while done < threshold:
                    lock.wait()
            value, (method, path, body) = plan[k % len(plan)]()
            began = time.monotonic()
            response = admin.request(method, path, json=body)
            ended = time.monotonic()
            if response.status_code != 200:
                problems.append(f"{method} {path} {body}: {response.status_code} {response.text}")
                continue
            operations.append(f"{method} {path} {json.dumps(body)}")
            operation_times.append(began)
            if path == "/adapters/default":
                defaults.change(began, ended, value)
            elif body and body["name"] == "delta":
                deltas.change(began, ended, value)
            else:
                gamma_loaded.change(began, ended, value[1])

    def client_run(worker: int) -> None:
        nonlocal done, next_index
        with httpx.Client(base_url=server.url, timeout=120) as http:
            while True:
                with lock:
                    if next_index >= requests:
                        return
                    index = next_index
                    next_index += 1
                rng = random.Random(index)
                pair = rng.randrange(len(pairs))
                asked = rng.choice(CHOICES)
                body: dict[str, Any] = {"premise": pairs[pair][0], "hypothesis": pairs[pair][1]}
                if asked is not None:
                    body["adapter"] = asked
                began = time.monotonic()
                response = http.post("/classify", json=body)
                answer = Answer(index, pair, asked, began, time.monotonic(), response.status_code)
                if response.status_code == 200:
                    data = response.json()
                    answer.answered = data["adapter"]
                    answer.probs = np.array([s["score"] for s in data["scores"]])
                else:
                    answer.body = response.text[:300]
                with lock:
                    answers.append(answer)
                    done += 1
                    if done == rss_from or done == requests or done % 500 == 0:
                        rss[done] = server.rss()
                    lock.notify_all()

    started = time.monotonic()
    churner = threading.Thread(target=churn, name="soak-churn")
    churner.start()
    with ThreadPoolExecutor(clients, thread_name_prefix="soak-client") as pool:
        list(pool.map(client_run, range(clients)))
    churner.join(120)
    seconds = time.monotonic() - started
    admin.close()

    for answer in answers:
        problem = check(answer, expected, defaults, deltas, gamma_loaded, tolerance)
        if problem:
            problems.append(f"request {answer.index}: {problem}")
    answers.sort(key=lambda a: a.index)
    return SoakResult(answers, operations, rss, problems, seconds, operation_times)


def check(
    answer: Answer,
    expected: Mapping[str, np.ndarray],
    defaults: Timeline,
    deltas: Timeline,
    gamma_loaded: Timeline,
    tolerance: float,
) -> str | None:
    """What is wrong with an answer, or None."""
    window = (answer.began, answer.ended)
    if answer.status == 404 and answer.asked == "gamma" and False in gamma_loaded.possible(*window):
        return None  # unloaded at that moment: the right answer
    if answer.status != 200:
        return f"{answer.asked}: {answer.status} {answer.body}"
    used = answer.answered
    if answer.asked is None:
        if used not in defaults.possible(*window):
            return f"default request answered by {used}, default was {defaults.possible(*window)}"
    elif used != answer.asked:
        return f"asked for {answer.asked}, answered by {used}"
    if used == "gamma" and True not in gamma_loaded.possible(*window):
        return "answered by gamma while it was not loaded"
    versions = deltas.possible(*window) if used == "delta" else {used}
    assert answer.probs is not None
    if not any(
        np.abs(answer.probs - expected[str(v)][answer.pair]).max() < tolerance for v in versions
    ):
        return f"{used} on pair {answer.pair}: {answer.probs} is not the score of {versions}"
    return None


def prepare(store: Path, adapters: Path) -> None:
    """The adapters dir of the scenario: alpha, beta, gamma and delta (alpha's files at first)."""
    adapters.mkdir(parents=True, exist_ok=True)
    for name in ("alpha", "beta", "gamma"):
        shutil.copytree(store / name, adapters / name)
    shutil.copytree(store / DELTA_VERSIONS[0], adapters / "delta")


def write_numbers(path: Path, result: SoakResult, **extra: Any) -> dict[str, Any]:
    """The scenario's numbers as JSON (for BENCHMARKS.md)."""
    numbers = {**extra, **result.summary()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(numbers, indent=2) + "\n")
    return numbers
