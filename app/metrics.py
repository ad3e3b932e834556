"""Prometheus metrics, one registry per app (so several apps in one process never collide).

Labels carry only route templates, methods, status codes and names of loaded adapters: never a
raw path or other user input.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Summary,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.015, 0.025, 0.05, 0.08, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
UNMATCHED_ROUTE = "<unmatched>"
ENGINE_PHASES = ("batch_wait", "encode", "forward", "deliver")


class Metrics:
    """The service's collectors."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "nli_http_requests", "HTTP requests", ["route", "method", "status"], registry=r
        )
        self.latency = Histogram(
            "nli_http_request_duration_seconds",
            "HTTP request latency",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "nli_http_requests_in_flight",
            "HTTP requests the app is handling now (a scrape counts itself)",
            registry=r,
        )
        self.pairs = Counter(
            "nli_classified_pairs", "Pairs classified", ["route", "adapter"], registry=r
        )
        self.classify_latency = Histogram(
            "nli_classify_duration_seconds",
            "Time from queueing to answer, per route and adapter",
            ["route", "adapter"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_rows = Histogram(
            "nli_batch_rows",
            "Rows per scoring step, by priority",
            ["priority"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.batch_requests = Histogram(
            "nli_batch_requests",
            "Interactive requests scored together in one step",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.engine_seconds = Counter(
            "nli_engine_seconds",
            "Scoring worker time in its interactive steps, by phase: batch_wait (for a fuller "
            "batch), encode (tokenising), forward (scoring, waiting for the device included), "
            "deliver (handing the results to the event loop)",
            ["phase"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "nli_queue_depth", "Work items waiting to be scored", ["priority"], registry=r
        )
        self.queue_rejections = Counter(
            "nli_queue_rejections", "Requests refused because the queue was full", registry=r
        )
        self.adapters_loaded = Gauge("nli_adapters_loaded", "Adapters loaded", registry=r)
        self.adapter_loads = Counter(
            "nli_adapter_operations", "Adapter operations", ["operation"], registry=r
        )
        self.ready = Gauge("nli_model_ready", "1 once the base model is loaded", registry=r)
        self.jobs = Counter(
            "nli_evaluation_jobs", "Evaluation jobs by final status", ["status"], registry=r
        )
        self.oom_failures = Counter(
            "nli_oom_failures", "Requests that failed for lack of device memory", registry=r
        )
        self.gc_pauses = Summary(
            "nli_gc_pause_seconds",
            "Garbage-collector pauses of the whole process, by generation (2 = full collection)",
            ["generation"],
            registry=r,
        )
        for priority in ("interactive", "evaluation"):
            self.queue_depth.labels(priority).set(0)
        for phase in ENGINE_PHASES:
            self.engine_seconds.labels(phase)

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
