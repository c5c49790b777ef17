"""Readings from the machine itself: thermal zones, the Pi firmware's throttling flags, CPU frequency,
fan, load and memory. Every path is under a configurable sysfs/procfs root, so tests point them at a
fixture tree of a Raspberry Pi 5. A source that is missing on this machine reads as None."""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

#: Where the firmware driver exposes get_throttled (Pi 4 and Pi 5 kernels name the soc node differently).
_THROTTLED_GLOBS = (
    "devices/platform/soc/soc:firmware/get_throttled",
    "devices/platform/*/*:firmware/get_throttled",
    "devices/platform/*firmware*/get_throttled",
)
_ZONE_NAME = re.compile(r"[^a-z0-9]+")


def parse_throttled(text: str) -> int:
    """``0x50005``, ``50005`` (the sysfs node prints hex) or ``throttled=0x50005`` (vcgencmd)."""
    value = text.strip().rpartition("=")[2].strip()
    return int(value, 16)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _read_number(path: Path) -> float | None:
    text = _read(path)
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


@dataclass
class HostReadings:
    """One pass over the machine's sources."""

    zone_temps_c: dict[str, float] = field(default_factory=dict)
    throttled_bits: int | None = None
    cpu_freq_mhz: float | None = None
    fan_rpm: float | None = None
    fan_state: int | None = None
    cpu_load_1m: float | None = None
    mem_available_mb: float | None = None
    swap_used_mb: float | None = None

    @property
    def soc_temp_c(self) -> float | None:
        """The hottest zone (on a Pi 5 there is one, cpu-thermal)."""
        return max(self.zone_temps_c.values()) if self.zone_temps_c else None


class HostSensors:
    """Reads the sources under ``sysfs_root`` and ``procfs_root``; paths are found once, at start."""

    def __init__(self, sysfs_root: Path, procfs_root: Path, vcgencmd: str | None = "vcgencmd") -> None:
        self.sysfs = sysfs_root
        self.procfs = procfs_root
        self._zones = self._find_zones()
        self._throttled_node = next(
            (path for pattern in _THROTTLED_GLOBS for path in sorted(sysfs_root.glob(pattern))), None
        )
        # vcgencmd only when the firmware node is absent (older kernels); it costs a process per sample.
        self._vcgencmd = shutil.which(vcgencmd) if vcgencmd and self._throttled_node is None else None
        self._freq_files = sorted(sysfs_root.glob("devices/system/cpu/cpu[0-9]*/cpufreq/scaling_cur_freq"))
        self._fan_inputs = sorted(sysfs_root.glob("class/hwmon/hwmon*/fan1_input"))
        self._fan_devices = [
            d
            for d in sorted(sysfs_root.glob("class/thermal/cooling_device*"))
            if "fan" in (_read(d / "type") or "")
        ]

    def _find_zones(self) -> dict[str, Path]:
        zones: dict[str, Path] = {}
        for zone in sorted(self.sysfs.glob("class/thermal/thermal_zone*")):
            kind = _ZONE_NAME.sub("_", (_read(zone / "type") or zone.name).lower()).strip("_") or zone.name
            name = kind if kind not in zones else f"{kind}_{zone.name.removeprefix('thermal_zone')}"
            zones[name[:40]] = zone / "temp"
        return zones

    def read(self) -> HostReadings:
        """Sample every source now."""
        readings = HostReadings()
        for name, path in self._zones.items():
            millidegrees = _read_number(path)
            if millidegrees is not None:
                readings.zone_temps_c[name] = round(millidegrees / 1000, 2)
        readings.throttled_bits = self._throttled()
        freqs = [f for f in (_read_number(p) for p in self._freq_files) if f is not None]
        readings.cpu_freq_mhz = round(max(freqs) / 1000, 1) if freqs else None
        rpms = [r for r in (_read_number(p) for p in self._fan_inputs) if r is not None]
        readings.fan_rpm = max(rpms) if rpms else None
        states = [s for s in (_read_number(d / "cur_state") for d in self._fan_devices) if s is not None]
        readings.fan_state = int(max(states)) if states else None
        load = _read(self.procfs / "loadavg")
        if load:
            with contextlib.suppress(ValueError):
                readings.cpu_load_1m = float(load.split()[0])
        meminfo = self._meminfo_kb()
        if "MemAvailable" in meminfo:
            readings.mem_available_mb = round(meminfo["MemAvailable"] / 1024, 1)
        if "SwapTotal" in meminfo and "SwapFree" in meminfo:
            readings.swap_used_mb = round((meminfo["SwapTotal"] - meminfo["SwapFree"]) / 1024, 1)
        return readings

    def _meminfo_kb(self) -> dict[str, int]:
        values: dict[str, int] = {}
        for line in (_read(self.procfs / "meminfo") or "").splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                values[key] = int(parts[0])
        return values

    def _throttled(self) -> int | None:
        try:
            if self._throttled_node is not None:
                text = _read(self._throttled_node)
                return parse_throttled(text) if text else None
            if self._vcgencmd is not None:
                result = subprocess.run(
                    [self._vcgencmd, "get_throttled"], capture_output=True, text=True, timeout=2, check=True
                )
                return parse_throttled(result.stdout)
        except (ValueError, OSError, subprocess.SubprocessError) as exc:
            log.debug("cannot read the throttling flags: %s", exc)
        return None
