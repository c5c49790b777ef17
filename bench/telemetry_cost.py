"""CPU cost of telemetry at 1 Hz (target: <= 1 % of one core).

Two measurements in one run:
1. in process: CPU time of one sample (host readings + serving figures + contract validation + JSON)
   against the Pi 5 fixture tree and against this machine's real /sys and /proc;
2. end to end: CPU time of a real `immune-edge run` (runtime off, so only the control plane runs) with
   telemetry at 1 Hz against the same daemon with telemetry off, over the same wall time; the
   difference is what telemetry costs, publishing over MQTT included.

Run: .venv/bin/python -m bench.telemetry_cost [--samples 300] [--seconds 30]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from rich.console import Console
from rich.table import Table

from edge.state.db import StateDB
from edge.state.ledger import Ledger
from edge.telemetry.host import HostSensors
from edge.telemetry.sampler import TelemetrySampler
from shared.signing import generate_key
from tests.conftest import FleetKeys
from tests.harness.broker import Mosquitto
from tests.harness.edge import write_edge_config
from tests.harness.pi5 import Pi5Tree

console = Console()


def per_sample_ms(sysfs: Path, procfs: Path, samples: int, state: Path) -> float:
    db = StateDB(state / "state.db")
    sampler = TelemetrySampler("pi-1", "lab", HostSensors(sysfs, procfs, None), Ledger(db), state)
    sampler.sample().to_json()  # first call finds paths and warms caches
    started = time.process_time()
    for _ in range(samples):
        sampler.sample().to_json()
    return (time.process_time() - started) / samples * 1000


def daemon_cpu_s(config: Path, seconds: float) -> float:
    process = subprocess.Popen([sys.executable, "-m", "edge.cli", "run", "--config", str(config)])
    try:
        time.sleep(3)  # imports and connection are start-up cost, not telemetry
        handle = psutil.Process(process.pid)
        before = handle.cpu_times()
        time.sleep(seconds)
        after = handle.cpu_times()
        return (after.user + after.system) - (before.user + before.system)
    finally:
        process.terminate()
        process.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    keys = FleetKeys(*(generate_key() for _ in range(6)))
    with tempfile.TemporaryDirectory() as tmp, Mosquitto(Path(tmp) / "broker") as broker:
        root = Path(tmp)
        pi = Pi5Tree(root / "pi").create()
        (root / "s1").mkdir()
        (root / "s2").mkdir()
        fixture_ms = per_sample_ms(pi.sysfs, pi.procfs, args.samples, root / "s1")
        host_ms = per_sample_ms(Path("/sys"), Path("/proc"), args.samples, root / "s2")
        runs = {}
        for label, enabled in (("telemetry off", "false"), ("telemetry 1 Hz", "true")):
            config = write_edge_config(
                root / label.replace(" ", "-"),
                broker,
                keys.keyring(),
                extra=f"[telemetry]\nenabled = {enabled}\ninterval_s = 1\n",
            )
            runs[label] = daemon_cpu_s(config, args.seconds)
    budget_ms = 10.0  # 1 % of one core at one sample per second
    table = Table("measurement", "CPU per second at 1 Hz (ms)", "share of one core", "vs 1 % budget")
    table.add_row(
        "one sample, Pi 5 fixture tree",
        f"{fixture_ms:.2f}",
        f"{fixture_ms / 10:.3f} %",
        f"{fixture_ms / budget_ms:.3f}x",
    )
    table.add_row(
        "one sample, this machine's /sys + /proc",
        f"{host_ms:.2f}",
        f"{host_ms / 10:.3f} %",
        f"{host_ms / budget_ms:.3f}x",
    )
    off, on = runs["telemetry off"], runs["telemetry 1 Hz"]
    extra_ms = max(on - off, 0.0) / args.seconds * 1000
    table.add_row(
        f"daemon, 1 Hz minus off ({on:.2f} - {off:.2f} s CPU in {args.seconds:.0f} s)",
        f"{extra_ms:.2f}",
        f"{extra_ms / 10:.3f} %",
        f"{extra_ms / budget_ms:.3f}x",
    )
    console.print(table)


if __name__ == "__main__":
    main()
