"""The daemon's telemetry thread: sample, publish QoS 0, and refresh the summary in the retained
status now and then. Thermal back-off runs on its own (edge.telemetry.thermal.ThermalWatch); the
samples only report its state."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from edge.config import TelemetrySettings
from edge.telemetry.sampler import TelemetrySampler
from edge.telemetry.thermal import ThermalGovernor
from shared.messages import Telemetry

log = logging.getLogger(__name__)

#: The figures the retained status carries, so `immune-fleet status` has them without waiting.
SUMMARY_FIELDS = (
    "tokens_per_second",
    "prompt_tokens_per_second",
    "ttft_ms",
    "rss_mb",
    "worker_rss_mb",
    "mem_available_mb",
    "soc_temp_c",
    "throttled_bits",
    "cpu_load_1m",
    "disk_free_mb",
    "n_threads",
    "n_threads_batch",
    "requests_total",
    "errors_total",
    "uptime_s",
    "thermal_limited",
)


def summarise(sample: Telemetry, previous: dict[str, float]) -> dict[str, float]:
    """Summary figures; rates keep their last known value through idle intervals."""
    summary = dict(previous)
    for name in SUMMARY_FIELDS:
        value = getattr(sample, name)
        if value is not None:
            summary[name] = float(value)
    return summary


class TelemetryLoop:
    """Runs in its own thread so slow sources or a busy worker never delay MQTT handling."""

    def __init__(
        self,
        settings: TelemetrySettings,
        sampler: TelemetrySampler,
        governor: ThermalGovernor | None,
        publish: Callable[[Telemetry], None],
        report: Callable[[dict[str, float]], None],
    ) -> None:
        self.settings = settings
        self.sampler = sampler
        self.governor = governor
        self.publish = publish
        self.report = report
        self.summary: dict[str, float] = {}
        self._next_report = 0.0
        self._tick_lock = threading.Lock()  # the thermal thread may ask for a sample too
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="telemetry", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def tick(self, report_now: bool = False) -> Telemetry:
        """One sample: read, publish, and report the summary when due (or ``report_now``: after a
        thermal change, so the status shows the new state at once)."""
        with self._tick_lock:
            readings = self.sampler.sensors.read()
            limited = self.governor is not None and self.governor.limited
            sample = self.sampler.sample(readings, thermal_limited=limited)
            self.publish(sample)
            self.summary = summarise(sample, self.summary)
            now = time.monotonic()
            if report_now or now >= self._next_report:
                self._next_report = now + self.settings.status_every_s
                self.report(self.summary)
            return sample

    def _run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                self.tick()
            except Exception:  # one bad reading must not end telemetry for good
                log.exception("telemetry sample failed")
            if self._stop.wait(max(self.settings.interval_s - (time.monotonic() - started), 0.05)):
                return
