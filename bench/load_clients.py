"""Closed-loop HTTP load on loopback: N clients, each with one request in flight at a time.

The clients are ``httpx.AsyncClient`` coroutines (keep-alive connections) spread over a few
spawned processes, because one Python process cannot send requests faster than about a
thousand per second and would measure itself instead of the server. Every request's completion
time, latency and status come back to the parent, which counts only those that completed inside
the measurement window (after a warm-up) for requests/s and latency percentiles, and every
request, warm-up included, for errors.

Nothing here imports torch: spawned children import this module and their parent's.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import queue as queue_module
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench.common import latency_summary

# (completion time [time.time()], latency [s], HTTP status or 0 for a transport error,
#  payload index, answering adapter or None, label probabilities or None)
Record = tuple[float, float, int, int, str | None, tuple[float, ...] | None]


@dataclass
class LoadResult:
    """What one load run measured."""

    clients: int
    processes: int
    window_s: float
    requests: int  # successful, inside the window
    requests_per_s: float
    latency: dict[str, float | int]
    errors: int  # every request, warm-up included
    statuses: dict[str, int]
    error_samples: list[str]
    records: list[Record] = field(default_factory=list, repr=False)

    def summary(self) -> dict[str, Any]:
        """JSON-ready numbers (without the per-request records)."""
        return {
            "clients": self.clients,
            "client_processes": self.processes,
            "window_s": round(self.window_s, 2),
            "requests": self.requests,
            "requests_per_s": round(self.requests_per_s, 1),
            **{f"latency_{k}": v for k, v in self.latency.items() if k != "n"},
            "errors": self.errors,
            "statuses": self.statuses,
            "error_samples": self.error_samples,
        }


def run_load(
    url: str,
    payloads: list[dict[str, Any]],
    *,
    clients: int,
    processes: int,
    duration_s: float,
    warmup_s: float = 1.0,
    path: str = "/classify",
    timeout_s: float = 60.0,
    keep_bodies: bool = False,
    during: Callable[[], None] | None = None,
    tail_s: float = 0.5,
) -> LoadResult:
    """Run ``clients`` closed-loop clients against ``url + path``.

    Without ``during`` the load lasts ``warmup_s + duration_s``. With it, ``during()`` runs in
    this process once the warm-up is over (e.g. adapter swaps), and the load stops ``tail_s``
    after it returns (at the latest after ``warmup_s + duration_s``); the window is then the
    time ``during`` took plus the tail.
    """
    processes = max(1, min(processes, clients))
    ctx = mp.get_context("spawn")
    results: Any = ctx.Queue()
    ready: Any = ctx.Queue()
    go = ctx.Event()
    stop = ctx.Event()
    start_at = ctx.Value("d", 0.0)
    base, extra = divmod(clients, processes)
    shares = [base + (1 if i < extra else 0) for i in range(processes)]
    workers = []
    first = 0
    for index, share in enumerate(shares):
        args = (url, path, share, first, payloads, timeout_s, keep_bodies)
        worker = ctx.Process(
            target=_client_process,
            args=(*args, warmup_s + duration_s, go, stop, start_at, ready, results),
            name=f"bench-clients-{index}",
            daemon=True,
        )
        worker.start()
        workers.append(worker)
        first += share
    for _ in workers:
        ready.get(timeout=120)
    start_at.value = time.time() + 0.2
    go.set()
    window_start = start_at.value + warmup_s
    window_end = window_start + duration_s
    if during is not None:
        time.sleep(max(0.0, window_start - time.time()))
        try:
            during()
        finally:
            time.sleep(tail_s)
            window_end = min(time.time(), window_end)
            stop.set()
    else:
        time.sleep(max(0.0, window_end - time.time()))
    collected: list[tuple[list[Record], list[str]]] = []
    deadline = time.time() + timeout_s + 30
    while len(collected) < len(workers):
        try:
            collected.append(results.get(timeout=max(1.0, deadline - time.time())))
        except queue_module.Empty:
            break
    for worker in workers:
        worker.join(timeout=10)
        if worker.is_alive():
            worker.kill()
    if len(collected) < len(workers):
        raise RuntimeError(f"only {len(collected)} of {len(workers)} client processes reported")
    records = [r for rows, _ in collected for r in rows]
    samples = [s for _, errs in collected for s in errs][:5]
    in_window = [r for r in records if window_start <= r[0] <= window_end and r[2] == 200]
    window = max(window_end - window_start, 1e-9)
    statuses = Counter(str(r[2]) for r in records)
    return LoadResult(
        clients=clients,
        processes=len(workers),
        window_s=window,
        requests=len(in_window),
        requests_per_s=len(in_window) / window,
        latency=latency_summary([r[1] for r in in_window]),
        errors=sum(1 for r in records if r[2] != 200),
        statuses=dict(sorted(statuses.items())),
        error_samples=samples,
        records=records if keep_bodies else [],
    )


def _client_process(
    url: str,
    path: str,
    clients: int,
    first: int,
    payloads: list[dict[str, Any]],
    timeout_s: float,
    keep_bodies: bool,
    max_s: float,
    go: Any,
    stop: Any,
    start_at: Any,
    ready: Any,
    results: Any,
) -> None:
    ready.put(True)
    go.wait()
    rows, errors = asyncio.run(
        _clients(url, path, clients, first, payloads, timeout_s, keep_bodies, max_s, stop, start_at)
    )
    results.put((rows, errors))


async def _clients(
    url: str,
    path: str,
    clients: int,
    first: int,
    payloads: list[dict[str, Any]],
    timeout_s: float,
    keep_bodies: bool,
    max_s: float,
    stop: Any,
    start_at: Any,
) -> tuple[list[Record], list[str]]:
    begin = start_at.value
    end = begin + max_s
    rows: list[Record] = []
    errors: list[str] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout_s) as client:

        async def one_client(number: int) -> None:
            await asyncio.sleep(max(0.0, begin - time.time()))
            k = number * 7919  # clients start at different pairs
            while time.time() < end and not stop.is_set():
                index = k % len(payloads)
                k += 1
                started = time.perf_counter()
                adapter = probs = None
                try:
                    response = await client.post(path, json=payloads[index])
                    status = response.status_code
                    if status == 200 and keep_bodies:
                        body = response.json()
                        adapter = body["adapter"]
                        probs = tuple(item["score"] for item in body["scores"])
                    elif status != 200 and len(errors) < 5:
                        errors.append(f"{status}: {response.text[:200]}")
                except httpx.HTTPError as exc:
                    status = 0
                    if len(errors) < 5:
                        errors.append(f"{type(exc).__name__}: {exc}")
                latency = time.perf_counter() - started
                rows.append((time.time(), latency, status, index, adapter, probs))

        await asyncio.gather(*(one_client(first + i) for i in range(clients)))
    return rows, errors
