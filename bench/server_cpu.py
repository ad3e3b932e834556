"""CPU time the service spends per ``/classify`` request, by thread: what caps one process.

    python -m bench.server_cpu --model FOLDER [--device cpu] [--clients 16] [--duration 10]

Starts ``nli-serve`` on loopback with ``--model`` and no adapter (``base``), runs
``--clients`` closed-loop clients (``bench.load_clients``) and reads the server's per-thread
CPU times (psutil) before and after. The event-loop thread (HTTP, validation, JSON) and the
batching worker (tokenising, scoring) share one interpreter lock, so their summed CPU time per
request bounds the requests/s of one process, whatever the accelerator. Use a tiny model on a
CPU to see the service's own overhead (the worker's time then includes a small forward pass).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import psutil

from bench.classify_latency import free_port, start_server, stop_server, wait_ready
from bench.common import DEFAULT_DATA, read_pairs
from bench.load_clients import run_load


def thread_cpu(process: psutil.Process) -> dict[int, float]:
    return {t.id: t.user_time + t.system_time for t in process.threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help="base model folder (or alias)")
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--client-procs", type=int, default=1)
    parser.add_argument("--duration", type=float, default=10.0)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="nli-bench-cpu-"))
    env = dict(
        os.environ,
        NLI_BASE_MODEL=args.model,
        NLI_DEVICE=args.device,
        NLI_DEFAULT_ADAPTER="base",
        NLI_DATA_DIR=str(work / "data"),
        NLI_ADAPTERS_DIR=str(work / "adapters"),
    )
    port = free_port()
    server = start_server(env, port, work / "server.log", access_log=False)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, server, 600)
        payloads = [{"premise": p, "hypothesis": h} for p, h in read_pairs(args.data, 500)]
        process = psutil.Process(server.pid)
        before, started = thread_cpu(process), time.perf_counter()
        load = run_load(
            url,
            payloads,
            clients=args.clients,
            processes=args.client_procs,
            duration_s=args.duration,
            warmup_s=0.0,
        )
        after, wall = thread_cpu(process), time.perf_counter() - started
    finally:
        stop_server(server)
    answered = load.statuses.get("200", 0)
    spent = {tid: after[tid] - before.get(tid, 0.0) for tid in after}
    main_thread = spent.pop(server.pid, 0.0)
    others = sorted(spent.values(), reverse=True)
    per_request = lambda seconds: round(1000 * seconds / max(answered, 1), 3)  # noqa: E731
    print(
        json.dumps(
            {
                "benchmark": "server_cpu",
                "model": args.model,
                "device": args.device,
                "clients": args.clients,
                "answered": answered,
                "requests_per_s": round(answered / wall, 1),
                "cpu_ms_per_request": per_request(main_thread + sum(others)),
                "event_loop_ms_per_request": per_request(main_thread),
                "busiest_other_threads_ms_per_request": [per_request(s) for s in others[:3]],
                "cpu_count": os.cpu_count(),
            }
        )
    )


if __name__ == "__main__":
    main()
