"""A fixture tree of the sysfs and procfs files a Raspberry Pi 5 exposes, in the layout its kernel
uses, so telemetry and thermal back-off run against Pi readings on any machine."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

FIRMWARE_NODE = "devices/platform/soc@107c000000/soc@107c000000:firmware/get_throttled"


@dataclass
class Pi5Tree:
    """``sys/`` and ``proc/`` under ``root``; setters change readings while a daemon runs."""

    root: Path

    @property
    def sysfs(self) -> Path:
        return self.root / "sys"

    @property
    def procfs(self) -> Path:
        return self.root / "proc"

    def create(self, temp_c: float = 52.3, throttled: int = 0, mem_available_mb: int = 6000) -> Pi5Tree:
        zone = self.sysfs / "class/thermal/thermal_zone0"
        _write(zone / "type", "cpu-thermal")
        fan = self.sysfs / "class/thermal/cooling_device0"
        _write(fan / "type", "pwm-fan")
        _write(fan / "max_state", "4")
        _write(fan / "cur_state", "2")
        _write(self.sysfs / "class/hwmon/hwmon2/fan1_input", "2843")
        _write(self.sysfs / "class/hwmon/hwmon0/name", "cpu_thermal")  # a hwmon without a fan
        for cpu in range(4):
            _write(self.sysfs / f"devices/system/cpu/cpu{cpu}/cpufreq/scaling_cur_freq", "2400000")
        _write(self.procfs / "loadavg", "0.52 0.40 0.33 1/234 5678")
        self.set_temperature(temp_c)
        self.set_throttled(throttled)
        self.set_mem_available(mem_available_mb)
        return self

    def set_temperature(self, temp_c: float) -> None:
        _write(self.sysfs / "class/thermal/thermal_zone0/temp", str(round(temp_c * 1000)))

    def set_throttled(self, bits: int) -> None:
        _write(self.sysfs / FIRMWARE_NODE, f"{bits:x}")

    def set_mem_available(self, mb: int) -> None:
        _write(
            self.procfs / "meminfo",
            f"MemTotal:        8245360 kB\nMemFree:         6000000 kB\nMemAvailable:    {mb * 1024} kB\n"
            "SwapTotal:        204796 kB\nSwapFree:         153596 kB\n",
        )


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text + "\n")
    tmp.replace(path)  # readers never see a half-written value
