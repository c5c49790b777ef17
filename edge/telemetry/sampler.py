"""Builds one telemetry sample: the machine's readings, the serving figures of the last interval and
the daemon's own footprint, as the flat :class:`shared.messages.Telemetry` contract."""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from edge.metrics import Metrics, UsageTotals
from edge.runtime.health import worker_rss_mb
from edge.runtime.serving import ServingRuntime
from edge.state.ledger import Ledger
from edge.telemetry.host import HostReadings, HostSensors
from shared.messages import MAX_ADAPTERS, Telemetry, adapter_slug
from shared.throttle import decode_throttled


def _rate(amount: float, seconds: float) -> float | None:
    return round(amount / seconds, 2) if seconds > 0 and amount > 0 else None


class TelemetrySampler:
    """Samples on demand; rates are computed against the previous sample."""

    def __init__(
        self,
        device_id: str,
        fleet: str,
        sensors: HostSensors,
        ledger: Ledger,
        store_dir: Path,
        runtime: ServingRuntime | None = None,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
        refusals: Callable[[], int] | None = None,
    ) -> None:
        self.device_id = device_id
        self.fleet = fleet
        self.sensors = sensors
        self.ledger = ledger
        self.store_dir = store_dir
        self.runtime = runtime
        self.metrics = metrics
        self.clock = clock
        self.refusals = refusals
        self._process = psutil.Process()
        self._started = time.monotonic()
        self._last_usage = UsageTotals()
        self._last_adapter_usage: dict[str, UsageTotals] = {}
        self._last_at: float | None = None
        self.latest: Telemetry | None = None

    def sample(self, readings: HostReadings | None = None, thermal_limited: bool | None = None) -> Telemetry:
        """One sample now (``readings``: host readings already taken this tick)."""
        readings = readings if readings is not None else self.sensors.read()
        now = self.clock()
        values: dict[str, object] = {
            "device_id": self.device_id,
            "fleet": self.fleet,
            "ts": now,
            "uptime_s": round(time.monotonic() - self._started, 1),
            "rss_mb": round(self._process.memory_info().rss / 2**20, 1),
            "mem_available_mb": readings.mem_available_mb,
            "swap_used_mb": readings.swap_used_mb,
            "cpu_load_1m": readings.cpu_load_1m,
            "cpu_freq_mhz": readings.cpu_freq_mhz,
            "soc_temp_c": readings.soc_temp_c,
            "throttled_bits": readings.throttled_bits,
            "fan_rpm": readings.fan_rpm,
            "fan_state": readings.fan_state,
            "thermal_limited": thermal_limited,
            "refusals_total": self.refusals() if self.refusals else None,
        }
        if self._last_at is not None:
            values["interval_s"] = round(max(now - self._last_at, 1e-3), 3)
        self._last_at = now
        if readings.throttled_bits is not None:
            values.update(decode_throttled(readings.throttled_bits))
        values.update({f"temp_{zone}_c": temp for zone, temp in readings.zone_temps_c.items()})
        current = self.ledger.current()
        if current is not None:
            values["model_name"], values["model_serial"] = current.name, current.serial
        with contextlib.suppress(OSError):
            values["disk_free_mb"] = round(shutil.disk_usage(self.store_dir).free / 2**20, 1)
        values.update(self._serving())
        self.latest = Telemetry.model_validate({k: v for k, v in values.items() if v is not None})
        return self.latest

    def _serving(self) -> dict[str, object]:
        values: dict[str, object] = {}
        if self.runtime is not None:
            router = self.runtime.router
            values["queue_depth"] = router.queue_depth
            values["n_threads"] = self.runtime.threads
            values["n_threads_batch"] = self.runtime.threads_batch
            active, standby = router.active, self.runtime.standby
            if active is not None:
                values["worker_rss_mb"] = round(worker_rss_mb(active.worker), 1)
            if standby is not None:
                values["standby_worker_rss_mb"] = round(worker_rss_mb(standby.worker), 1)
        if self.metrics is not None:
            usage, last = self.metrics.usage(), self._last_usage
            self._last_usage = usage
            values["requests_total"], values["errors_total"] = usage.requests, usage.errors
            values["tokens_per_second"] = _rate(
                usage.completion_tokens - last.completion_tokens, usage.decode_s - last.decode_s
            )
            values["prompt_tokens_per_second"] = _rate(
                usage.prompt_tokens - last.prompt_tokens, usage.prompt_s - last.prompt_s
            )
            if usage.ttft_count > last.ttft_count:
                ttft = (usage.ttft_s - last.ttft_s) / (usage.ttft_count - last.ttft_count)
                values["ttft_ms"] = round(ttft * 1000, 1)
            values.update(self._adapters(self.metrics))
            refused, versions = self.metrics.client_totals()
            values["context_refusals_total"] = refused
            values.update(
                {f"prompt_version_{adapter_slug(v)}_requests_total": n for v, n in versions.items()}
            )
        return values

    def _adapters(self, metrics: Metrics) -> dict[str, object]:
        """Each served adapter's totals and its decode rate over the interval, as flat keys."""
        names = [a.name for a in self.runtime.router.adapters][:MAX_ADAPTERS] if self.runtime else []
        values: dict[str, object] = {}
        now: dict[str, UsageTotals] = {}
        for name in names:
            usage = now[name] = metrics.model_usage(name)
            last = self._last_adapter_usage.get(name, UsageTotals())
            key = f"adapter_{adapter_slug(name)}"
            values[f"{key}_requests_total"], values[f"{key}_errors_total"] = usage.requests, usage.errors
            values[f"{key}_tokens_per_second"] = _rate(
                usage.completion_tokens - last.completion_tokens, usage.decode_s - last.decode_s
            )
        self._last_adapter_usage = now
        return values
