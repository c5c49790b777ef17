"""Prometheus metrics of the data plane (served at ``/metrics``). One registry per daemon, so tests
that start several apps in one process do not share counters."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edge.runtime.protocol import WorkerEvent
from shared.messages import MAX_PROMPT_VERSIONS, Telemetry
from shared.throttle import THROTTLE_BITS

#: Telemetry fields that are not figures (identity) or are exported with labels instead.
_NOT_GAUGES = {"device_id", "fleet", "model_name", "ts"} | {
    f"{flag}_{when}" for flag in THROTTLE_BITS for when in ("now", "since_boot")
}

#: Where prompt versions beyond MAX_PROMPT_VERSIONS are counted.
OTHER_VERSION = "other"

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)


@dataclass
class UsageTotals:
    """Running totals since start; telemetry reports the difference between two snapshots."""

    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    prompt_s: float = 0.0
    completion_tokens: int = 0
    decode_s: float = 0.0
    ttft_s: float = 0.0
    ttft_count: int = 0

    def add(self, status: int, done: WorkerEvent | None) -> None:
        """Count one finished request."""
        self.requests += 1
        self.errors += status >= 500
        if done is not None:
            self.prompt_tokens += done.prompt_tokens
            self.prompt_s += done.prompt_ms / 1000
            self.completion_tokens += done.completion_tokens
            self.decode_s += max(done.total_ms - done.prompt_ms, 0.0) / 1000


class Metrics:
    """Counters and histograms the API and the runtime update."""

    # Over 60 lines on purpose: one flat declaration per metric is the /metrics catalogue in one place.
    def __init__(self) -> None:
        self._usage = UsageTotals()
        #: The same totals per served model name (an adapter's name for its requests).
        self._model_usage: dict[str, UsageTotals] = {}
        self._usage_lock = threading.Lock()
        self._context_refusals = 0
        self._prompt_versions: dict[str, int] = {}
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
        self.model_requests = Counter(
            "immune_edge_model_requests",
            "Finished generation requests by the model (or adapter) name that served them",
            ["model", "outcome"],
            registry=r,
        )
        self.model_completion_tokens = Counter(
            "immune_edge_model_completion_tokens",
            "Tokens generated, by the model (or adapter) name that served them",
            ["model"],
            registry=r,
        )
        self.context_refusals = Counter(
            "immune_edge_context_refusals",
            "Requests refused because their prompt does not fit the model's context, by model",
            ["model"],
            registry=r,
        )
        self.prompt_versions = Counter(
            "immune_edge_prompt_version_requests",
            "Requests carrying a client prompt version line (Slips' 'Prompt version:'), by model and version",
            ["model", "version"],
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
        self.prompt_cache = Gauge(
            "immune_edge_prompt_cache_bytes",
            "RAM the serving worker's prompt cache may use for KV states of older prompts",
            registry=r,
        )
        self.serving = Gauge(
            "immune_edge_serving", "1 for the model currently served", ["model", "serial"], registry=r
        )
        self.adapters = Gauge(
            "immune_edge_adapter_serving",
            "1 for each LoRA adapter served on the base model, by name and loaded version",
            ["adapter", "version"],
            registry=r,
        )

    def finished(
        self, endpoint: str, status: int, seconds: float, done: WorkerEvent | None, model: str
    ) -> None:
        """Account for one finished request of ``model`` (the name that served it; ``done`` is None
        when it produced no result)."""
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()
        outcome = "ok" if status == 200 else "error" if status >= 500 else "client"
        self.model_requests.labels(model=model, outcome=outcome).inc()
        with self._usage_lock:
            self._usage.add(status, done)
            self._model_usage.setdefault(model, UsageTotals()).add(status, done)
        if done is not None:
            self.latency.observe(seconds)
            self.prompt_tokens.inc(done.prompt_tokens)
            self.completion_tokens.inc(done.completion_tokens)
            self.model_completion_tokens.labels(model=model).inc(done.completion_tokens)

    def context_refused(self, model: str) -> None:
        """A request refused because its prompt does not fit ``model``'s context."""
        self.context_refusals.labels(model=model).inc()
        with self._usage_lock:
            self._context_refusals += 1

    def prompt_version(self, model: str, version: str) -> None:
        """A request to ``model`` carrying a client prompt version line; versions past the first
        MAX_PROMPT_VERSIONS are counted as ``other`` (a client cannot grow the label set)."""
        with self._usage_lock:
            if version not in self._prompt_versions and len(self._prompt_versions) >= MAX_PROMPT_VERSIONS:
                version = OTHER_VERSION
            self._prompt_versions[version] = self._prompt_versions.get(version, 0) + 1
        self.prompt_versions.labels(model=model, version=version).inc()

    def client_totals(self) -> tuple[int, dict[str, int]]:
        """Context refusals, and requests per client prompt version, since start."""
        with self._usage_lock:
            return self._context_refusals, dict(self._prompt_versions)

    def first_token(self, seconds: float) -> None:
        """Time from admission to a request's first token."""
        self.ttft.observe(seconds)
        with self._usage_lock:
            self._usage.ttft_s += seconds
            self._usage.ttft_count += 1

    def usage(self) -> UsageTotals:
        """A copy of the running totals."""
        with self._usage_lock:
            return replace(self._usage)

    def model_usage(self, model: str) -> UsageTotals:
        """A copy of the running totals of one served name (zeros when it served nothing)."""
        with self._usage_lock:
            return replace(self._model_usage.get(model, UsageTotals()))

    def watch_telemetry(self, latest: Callable[[], Telemetry | None]) -> None:
        """Export the device's telemetry (temperatures, throttling, memory...) on /metrics too."""
        self.registry.register(TelemetryCollector(latest))

    def watch_refusals(self, counts: Callable[[], dict[tuple[str, str], int]]) -> None:
        """Export the audit trail's refusal counts (exact, even when their log lines were not)."""
        self.registry.register(RefusalCollector(counts))

    def watch_queue(self, depth: Callable[[], int]) -> None:
        self.queue_depth.set_function(depth)

    def adapters_now(self, served: dict[str, str]) -> None:
        """The adapters served now (name -> version key); the others are dropped from /metrics."""
        self.adapters.clear()
        for name, version in served.items():
            self.adapters.labels(adapter=name, version=version).set(1)

    def loaded(self, prompt_cache_bytes: int) -> None:
        """What the serving worker reported when its model loaded."""
        self.prompt_cache.set(prompt_cache_bytes)

    def now_serving(self, name: str | None, serial: int | None) -> None:
        self.serving.clear()
        if name is not None:
            self.serving.labels(model=name, serial=str(serial or 0)).set(1)


class RefusalCollector(Collector):
    """``immune_edge_refusals_total{kind,reason}``, read from the audit trail at scrape time."""

    def __init__(self, counts: Callable[[], dict[tuple[str, str], int]]) -> None:
        self.counts = counts

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "immune_edge_refusals",
            "Inputs refused (manifests, commands, keyring updates, MQTT messages, API credentials)",
            labels=["kind", "reason"],
        )
        for (kind, reason), count in sorted(self.counts().items()):
            family.add_metric([kind, reason], count)
        yield family


class TelemetryCollector(Collector):
    """The latest telemetry sample as Prometheus gauges, read at scrape time."""

    def __init__(self, latest: Callable[[], Telemetry | None]) -> None:
        self.latest = latest

    def collect(self) -> Iterator[Metric]:
        sample = self.latest()
        if sample is None:
            return
        for name, info in Telemetry.model_fields.items():
            value = getattr(sample, name)
            if name in _NOT_GAUGES or value is None:
                continue
            yield GaugeMetricFamily(
                f"immune_edge_device_{name}", info.description or name, value=float(value)
            )
        zones = GaugeMetricFamily(
            "immune_edge_thermal_zone_celsius", "Temperature of each thermal zone", labels=["zone"]
        )
        for zone, temp in sample.zone_temps().items():
            zones.add_metric([zone], temp)
        yield zones
        flags = GaugeMetricFamily(
            "immune_edge_throttle_flag",
            "Pi firmware throttling flags (1: set), now and since boot",
            labels=["flag", "when"],
        )
        for flag in THROTTLE_BITS:
            for when in ("now", "since_boot"):
                value = getattr(sample, f"{flag}_{when}")
                if value is not None:
                    flags.add_metric([flag, when], float(value))
        yield flags
