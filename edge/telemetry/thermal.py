"""Thermal back-off: above the soft limit (or while the firmware throttles) the device runs inference
on fewer threads and defers low-priority requests, and goes back to normal once it has cooled below
the restore temperature."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Protocol

from edge.config import ThermalSettings
from edge.telemetry.host import HostReadings, HostSensors
from shared.throttle import decode_throttled

log = logging.getLogger(__name__)


class ThermalControls(Protocol):
    """What the governor can turn down (the serving runtime and its router)."""

    def limit_threads(self, cap: int | None) -> None: ...

    def defer_low_priority(self, on: bool) -> None: ...


class ThermalGovernor:
    """Decides, sample by sample, whether the device is hot; acts only on a change of state."""

    def __init__(self, settings: ThermalSettings, controls: ThermalControls | None) -> None:
        self.settings = settings
        self.controls = controls
        self.limited = False

    def _why_hot(self, readings: HostReadings) -> str | None:
        temp, s = readings.soc_temp_c, self.settings
        if temp is not None and temp >= s.soft_limit_c:
            return f"SoC at {temp:.1f} C (soft limit {s.soft_limit_c:.1f} C)"
        if s.react_to_throttled and readings.throttled_bits is not None:
            flags = decode_throttled(readings.throttled_bits)
            active = [name for name in ("throttled_now", "soft_temp_limit_now") if flags[name]]
            if active:
                return f"firmware reports {', '.join(active)}"
        return None

    def _cool(self, readings: HostReadings) -> bool:
        temp = readings.soc_temp_c
        return (temp is None or temp <= self.settings.restore_c) and self._why_hot(readings) is None

    def observe(self, readings: HostReadings) -> str | None:
        """Act on one sample; return a sentence describing the change, or None when nothing changed."""
        if not self.settings.enabled:
            return None
        if not self.limited:
            reason = self._why_hot(readings)
            if reason is None:
                return None
            self.limited = True
            self._apply(True)
            change = f"thermal limit on: {reason}; inference threads capped at {self.settings.hot_threads}"
            if self.settings.defer_low_priority:
                change += ", low-priority requests deferred"
        else:
            if not self._cool(readings):
                return None
            self.limited = False
            self._apply(False)
            temp = readings.soc_temp_c
            shown = f"{temp:.1f} C" if temp is not None else "no temperature reading"
            change = f"thermal limit off: {shown} (restore at {self.settings.restore_c:.1f} C)"
        log.warning("%s", change)
        return change

    def _apply(self, hot: bool) -> None:
        if self.controls is None:
            return
        self.controls.limit_threads(self.settings.hot_threads if hot else None)
        self.controls.defer_low_priority(hot and self.settings.defer_low_priority)


class ThermalWatch:
    """The data plane's own thread reading the sensors and letting the governor act, so thermal
    protection does not depend on telemetry being switched on (telemetry only reports it)."""

    def __init__(
        self,
        governor: ThermalGovernor,
        sensors: HostSensors,
        on_change: Callable[[str], None] = lambda change: None,
    ) -> None:
        self.governor = governor
        self.sensors = sensors
        self.on_change = on_change
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="thermal", daemon=True)

    def start(self) -> None:
        if self.governor.settings.enabled:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def check(self) -> str | None:
        """One reading: act on it, and say what changed (None: nothing)."""
        change = self.governor.observe(self.sensors.read())
        if change is not None:
            self.on_change(change)
        return change

    def _run(self) -> None:
        while not self._stop.wait(self.governor.settings.interval_s):
            try:
                self.check()
            except Exception:  # one bad reading must not end thermal protection for good
                log.exception("thermal check failed")
