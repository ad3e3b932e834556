"""The web stack's own CPU time per ``POST /classify``, in process: no socket, no model.

    python -m bench.route_overhead --model FOLDER [--requests 4000] [--rounds 3]

Builds the service (``app.main.create_app``, its middleware, routing, validation and
serialisation) around ``--model`` (a tiny one will do: it is loaded, never used), replaces the
runtime's scoring with a fixed answer, and drives the ASGI app directly with one request at a
time. What it times is the Python that every request costs the event loop besides the HTTP
parser: under many clients that shares one interpreter lock with the batching worker and bounds
requests/s (BENCHMARKS.md, "What bounded 64 clients"). Prints microseconds per request for
``/classify`` and ``/classify/batch`` (8 pairs), best and median of the rounds, as one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import git_commit, machine

PAIR = {"premise": "A man is playing a guitar on stage.", "hypothesis": "A man performs music."}


def asgi_post(path: str, body: bytes) -> tuple[dict[str, Any], Any]:
    """The scope and ``receive`` of one JSON POST."""
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000),
        "headers": [(b"host", b"localhost"), (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode())],
    }  # fmt: skip

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    return scope, receive


async def time_route(app: Any, path: str, payload: dict[str, Any], requests: int) -> float:
    """Microseconds per request over ``requests`` sequential requests; each must answer 200."""
    scope, receive = asgi_post(path, json.dumps(payload).encode())
    statuses: list[int] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    started = time.perf_counter()
    for _ in range(requests):
        await app(dict(scope), receive, send)
    elapsed = time.perf_counter() - started
    if set(statuses) != {200}:
        raise SystemExit(f"{path} answered {sorted(set(statuses))}, not only 200")
    return 1e6 * elapsed / requests


async def measure(model: str, requests: int, rounds: int) -> dict[str, Any]:
    """Per route, microseconds a request: best and median of ``rounds``."""
    with tempfile.TemporaryDirectory(prefix="nli-route-overhead-") as folder:
        return await _measure(Path(folder), model, requests, rounds)


async def _measure(work: Path, model: str, requests: int, rounds: int) -> dict[str, Any]:
    from app.main import create_app
    from app.runtime import ModelRuntime
    from app.settings import load_settings
    from nli.labels import build_result

    settings = load_settings(
        base_model=model, device="cpu", default_adapter="base",
        data_dir=work / "data", adapters_dir=work / "adapters",
    )  # fmt: skip
    app = create_app(settings)
    routes = {"/classify": PAIR, "/classify/batch": {"pairs": [PAIR] * 8}}
    results: dict[str, Any] = {}
    async with app.router.lifespan_context(app):
        runtime: ModelRuntime = app.state.runtime
        state = await asyncio.to_thread(runtime.wait, 600)  # the model loads in the background
        if state != "ready":
            raise SystemExit(f"the model did not load: {state} ({runtime.error})")

        async def fixed_scores(
            pairs: Sequence[tuple[str, str]], adapter: str | None, *, route: str
        ) -> list[dict[str, object]]:
            runtime.require_ready()
            return [build_result([0.7, 0.2, 0.1], adapter="base", base_model=model) for _ in pairs]

        # This app's runtime only: the routes call it, no model runs.
        runtime.classify = fixed_scores  # type: ignore[method-assign]
        for path, payload in routes.items():
            await time_route(app, path, payload, 200)  # warm-up
            times = [await time_route(app, path, payload, requests) for _ in range(rounds)]
            results[path] = {
                "best_us": round(min(times), 1),
                "median_us": round(statistics.median(times), 1),
                "rounds_us": [round(t, 1) for t in times],
            }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help="base model folder (loaded, not used)")
    parser.add_argument("--requests", type=int, default=4000, help="requests per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON line here")
    args = parser.parse_args()
    routes = asyncio.run(measure(args.model, args.requests, args.rounds))
    result = {
        "benchmark": "route_overhead",
        "machine": machine("cpu"),
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d"),
        "requests": args.requests,
        "routes": routes,
    }
    for path, row in routes.items():
        print(f"{path:>16}: {row['best_us']} us best, {row['median_us']} us median a request")
    print(json.dumps(result))
    if args.out:
        args.out.write_text(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
