"""Prometheus metrics of the data plane (served at ``/metrics``). One registry per daemon, so tests
that start several apps in one process do not share counters."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """Counters and histograms the API and the runtime update."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "immune_edge_requests",
            "API generation requests by endpoint and outcome",
            ["endpoint", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "immune_edge_request_seconds",
            "Time from admission to the last token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "immune_edge_time_to_first_token_seconds",
            "Time from admission to the first generated token (prompt processing dominates)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("immune_edge_prompt_tokens", "Prompt tokens evaluated", registry=r)
        self.completion_tokens = Counter("immune_edge_completion_tokens", "Tokens generated", registry=r)
        self.swaps = Counter(
            "immune_edge_model_swaps", "Routing flips to another model", ["kind"], registry=r
        )
        self.worker_restarts = Counter(
            "immune_edge_worker_restarts", "Inference workers restarted after a crash", registry=r
        )
        self.queue_depth = Gauge("immune_edge_queue_depth", "Requests running or waiting", registry=r)
        self.serving = Gauge(
            "immune_edge_serving", "1 for the model currently served", ["model", "serial"], registry=r
        )

    def watch_queue(self, depth: Callable[[], int]) -> None:
        self.queue_depth.set_function(depth)

    def now_serving(self, name: str | None, serial: int | None) -> None:
        self.serving.clear()
        if name is not None:
            self.serving.labels(model=name, serial=str(serial or 0)).set(1)
