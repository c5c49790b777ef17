"""N simulated devices against one real mosquitto: a staged rollout, the status table, and faults.

What is real: every simulated device is a whole `immune-edge run` control plane (edge.daemon.EdgeDaemon:
its own MQTT client id, session, Last Will and disk outbox, its own state database and store,
admission with signature checks, the deployer and its download with sha256 verification, reporting,
the telemetry loop), against one real mosquitto and a real HTTP artifact server; the operator side is
the real `immune-fleet` CLI. What is simulated: the model runtime (the store-only activator: no
llama.cpp worker, so a deployment commits once the verified file is in the store), the model (a GGUF
header padded to a few KB; every device downloads and keeps its own copy, so the artifact store sees N
real downloads; with ``--shared-cache`` a 4 MiB model sits once in a read-only seed directory that
every device's store links from, hashing it in full, and nothing is downloaded), the Pi's
sysfs/procfs (a fixture tree per device), and the hardware: N devices share 2 cores in a few
processes (``--processes``).

    python -m bench.fleet_scale --devices 100 200 500 1000        # the table of docs/benchmarks.md
    python -m bench.fleet_scale --devices 100 --faults            # 10% offline, broker restart, 503s
    python -m bench.fleet_scale --devices 1000 --shared-cache      # one copy of the model for all

``immune-fleet collect`` records the whole run beside the rollout; its peak RSS and the deployment
events it stored (against those expected) are reported.

Faults (``--faults``): 10% of the devices are killed before the rollout (their Last Will says so); the
broker is restarted while the last wave runs (persistence on: sessions and retained state survive);
the artifact store answers 503 to the first fifth of the downloads. A persistent-session observer
counts the devices' deployment events, expected (one per state per device) against received.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psutil
from rich.console import Console
from rich.table import Table

from fleet.client import FleetClient
from fleet.ops import status_rows
from fleet.settings import FleetSettings
from fleet.status_view import device_table
from shared.config import load_config
from shared.signing import generate_key, write_private_key
from tests.conftest import FleetKeys
from tests.factories import gguf_bytes
from tests.harness.artifact_server import ArtifactServer, Fault
from tests.harness.broker import Mosquitto
from tests.harness.edge import FleetObserver, sign_manifest, write_edge_config

console = Console(width=220)
GROUP = "sim"
#: The states a committed deployment reports, once each (edge.control.progress.FORWARD).
STATES_PER_DEPLOYMENT = 7
FLEET_CLI = [sys.executable, "-m", "fleet.cli"]


# -- the device processes ------------------------------------------------------------------------
def run_devices(configs: list[Path]) -> None:
    """One device process: a daemon per config, each in its own thread, until SIGTERM."""
    from edge.config import EdgeConfig
    from edge.daemon import EdgeDaemon

    daemons = [EdgeDaemon(load_config(config, EdgeConfig)) for config in configs]
    threads = [threading.Thread(target=d.run, daemon=True) for d in daemons]
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    for thread in threads:
        thread.start()
    stopping.wait()
    for daemon in daemons:
        daemon.stop()
    for thread in threads:
        thread.join(timeout=30)


# -- one measured run --------------------------------------------------------------------------------
@dataclass
class Result:
    devices: int
    faults: bool
    start_s: float = 0.0
    status_full_s: float = 0.0
    status_cli_s: float = 0.0
    status_cli_rows: int = 0
    status_cli_rss_mb: float = 0.0
    rollout_s: float = 0.0
    rollout_status: str = ""
    rollout_rss_mb: float = 0.0
    committed: int = 0
    offline: int = 0
    failed: int = 0
    mosquitto_cpu_s: float = 0.0
    messages_per_s: float = 0.0
    events_expected: int = 0
    events_received: int = 0
    #: Downloads the artifact store answered with 503 (the --faults run).
    refused_downloads: int = 0
    #: Why devices failed or were offline, with how many.
    reasons: dict[str, int] = field(default_factory=dict)
    devices_rss_mb: float = 0.0
    #: Bytes the artifact store sent, and bytes of model on the devices' disks (distinct inodes).
    downloaded_mb: float = 0.0
    stored_mb: float = 0.0
    collect_rss_mb: float = 0.0
    collect_events: int = 0
    notes: list[str] = field(default_factory=list)


def _peak_rss_mb(process: subprocess.Popen[Any]) -> float:
    """Sample a child's RSS until it exits; its peak in MB."""
    peak = 0.0
    try:
        watched = psutil.Process(process.pid)
        while process.poll() is None:
            peak = max(peak, watched.memory_info().rss / 2**20)
            time.sleep(0.05)
    except psutil.NoSuchProcess:
        pass
    return round(peak, 1)


class _SysCounter:
    """mosquitto's own count of messages received ($SYS, refreshed every sys_interval), summed
    across broker restarts: a restarted mosquitto counts from zero again."""

    def __init__(self, broker: Mosquitto) -> None:
        self._before_restarts = 0
        self._last = 0
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_connect = lambda c, *a: c.subscribe("$SYS/broker/messages/received")
        self.client.on_message = lambda c, u, m: self._update(int(m.payload))
        self.client.reconnect_delay_set(0.2, 1)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def _update(self, count: int) -> None:
        if count < self._last:
            self._before_restarts += self._last
        self._last = count

    @property
    def value(self) -> int:
        return self._before_restarts + self._last

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _stored_mb(devices_dir: Path) -> float:
    """Model bytes on disk across every device's store, counting a linked file once."""
    inodes = {
        (info.st_dev, info.st_ino): info.st_size
        for blob in devices_dir.glob("*/state/store/sha256/*")
        if (info := blob.stat())
    }
    return round(sum(inodes.values()) / 2**20, 2)


def _wait_collecting(database: Path, timeout_s: float = 120.0) -> None:
    """Until the collector stored a status: it is subscribed, so it sees the rollout from the start."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with sqlite3.connect(database) as db:
                if db.execute("SELECT COUNT(*) FROM statuses").fetchone()[0]:
                    return
        except sqlite3.Error:
            pass  # not created yet
        time.sleep(0.2)
    raise SystemExit("immune-fleet collect stored no status in time")


def _collected_events(database: Path, committed: list[str]) -> int:
    with sqlite3.connect(database) as db:
        rows = db.execute("SELECT device_id FROM events WHERE serial = 1").fetchall()
    wanted = set(committed)
    return sum(1 for (device,) in rows if device in wanted)


def measure(
    devices: int,
    processes: int,
    faults: bool,
    root: Path,
    rate: float | None = None,
    shared_cache: bool = False,
) -> Result:
    result = Result(devices, faults)
    seeds = root / "seed"
    seeds.mkdir()
    keys = FleetKeys(*(generate_key() for _ in range(6)))
    write_private_key(keys.operator, root / "operator.key")
    broker = Mosquitto(
        root / "broker", persistent=faults, extra="sys_interval 1\nmax_queued_messages 100000\n"
    )
    with broker, ArtifactServer(root / "artifacts") as server:
        operator_config = root / "fleet.toml"
        collector_config = root / "collector.toml"  # its own database: what it stored is its own
        for path, data_dir in ((operator_config, "operator"), (collector_config, "collector")):
            path.write_text(
                f'fleet = "lab"\noperator = "op-1"\noperator_keys = ["{root / "operator.key"}"]\n'
                f'data_dir = "{root / data_dir}"\n\n[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\n'
            )
        settings = load_config(operator_config, FleetSettings)
        ids = [f"sim-{i:04d}" for i in range(devices)]
        configs = [
            write_edge_config(
                root / "devices" / device,
                broker,
                keys.keyring(),
                device=device,
                groups=(GROUP,),
                keepalive_s=30,  # production timings: the tests' fast ones (5 s keepalive, 2 s
                fast=False,  # download stall watchdog) fail devices on 2 shared cores at N=1,000
                seed_dirs=(seeds,) if shared_cache else (),
                extra="[telemetry]\ninterval_s = 30\nstatus_every_s = 120\n",
            )
            for device in ids
        ]
        doomed = ids[: devices // 10] if faults else []  # the devices that go offline
        rest = [c for d, c in zip(ids, configs, strict=True) if d not in doomed]
        shares = [rest[i::processes] for i in range(processes)]
        if doomed:
            shares.append([c for d, c in zip(ids, configs, strict=True) if d in doomed])
        started = time.monotonic()
        children = [
            subprocess.Popen(
                [sys.executable, "-m", "bench.fleet_scale", "--worker", *map(str, share)],
                stderr=(root / f"devices-{n}.log").open("w"),
            )
            for n, share in enumerate(shares)
        ]
        observer = FleetObserver(broker, persistent=True)
        counter = _SysCounter(broker)
        try:
            with FleetClient(settings) as client:
                online = client.wait_for(lambda: sum(client.is_online(d) for d in ids) == devices, 600)
                if not online:
                    raise SystemExit(f"only {sum(client.is_online(d) for d in ids)} of {devices} came online")
            result.start_s = round(time.monotonic() - started, 1)
            result.devices_rss_mb = round(
                sum(psutil.Process(c.pid).memory_info().rss for c in children) / 2**20
            )

            # Time to a full status table: connect, receive every retained status, render the table.
            begun = time.monotonic()
            with FleetClient(settings) as client:
                client.wait_for(lambda: len(client.snapshot()) >= devices, 300)
                device_table(status_rows(client, None), "fleet")
            result.status_full_s = round(time.monotonic() - begun, 2)
            # Output to files, not pipes: a pipe nobody reads while the RSS is sampled would fill up.
            table_file = root / "status.json"
            with table_file.open("w") as table_out:
                status = subprocess.Popen(
                    [*FLEET_CLI, "status", "--json", "--wait", "2", "--config", str(operator_config)],
                    stdout=table_out,
                )
                begun = time.monotonic()
                result.status_cli_rss_mb = _peak_rss_mb(status)
            result.status_cli_s = round(time.monotonic() - begun, 2)
            result.status_cli_rows = len(json.loads(table_file.read_text()))

            if doomed:
                children[-1].kill()  # no clean stop: the broker publishes their Last Will
                with FleetClient(settings) as client:
                    client.wait_for(lambda: not any(client.is_online(d) for d in doomed), 120)
            data = gguf_bytes(padding=4 * 2**20 if shared_cache else 4096)
            url = server.add("model.gguf", data)
            if shared_cache:
                seed = seeds / hashlib.sha256(data).hexdigest()
                seed.write_bytes(data)
                seed.chmod(0o444)
            if faults:
                server.inject("model.gguf", Fault("fail", times=devices // 5, status=503))
            envelope = root / "manifest.dsse.json"
            envelope.write_bytes(sign_manifest([keys.trainer], data, url, serial=1))
            state_file = root / "rollout.json"
            cpu_before = sum(psutil.Process(broker.pid).cpu_times()[:2])
            messages_before, begun = counter.value, time.monotonic()
            rollout_file = root / "rollout-result.json"
            collector = subprocess.Popen(
                [*FLEET_CLI, "collect", "--config", str(collector_config)],
                stdout=subprocess.DEVNULL, stderr=(root / "collect.log").open("w"),
            )  # fmt: skip
            _wait_collecting(root / "collector" / "fleet.db")
            collector_peak: list[float] = []
            watcher = threading.Thread(target=lambda: collector_peak.append(_peak_rss_mb(collector)))
            watcher.start()
            rollout = subprocess.Popen(
                [*FLEET_CLI, "rollout", str(envelope), "--group", GROUP, "--canary", "1",
                 "--waves", "10%,50%,100%", "--max-failure-rate", "5%", "--min-finished", "20",
                 "--wave-timeout", "300", "--state", str(state_file), "--json", "--no-publish-desired",
                 "--config", str(operator_config), *(["--rate", str(rate)] if rate else [])],
                stdout=rollout_file.open("w"), stderr=(root / "rollout.log").open("w"),
            )  # fmt: skip
            stopped_at: list[float] = []  # the first mosquitto's CPU seconds when it was restarted
            if faults:
                threading.Thread(
                    target=_restart_in_last_wave, args=(broker, state_file, result, stopped_at), daemon=True
                ).start()
            result.rollout_rss_mb = _peak_rss_mb(rollout)
            rollout.wait()
            final = json.loads(rollout_file.read_text())
            result.rollout_s = round(time.monotonic() - begun, 1)
            time.sleep(2)  # one more $SYS refresh
            cpu_after = sum(psutil.Process(broker.pid).cpu_times()[:2])
            # After a restart: what the first process used until it stopped, plus all the second's.
            used = cpu_after - cpu_before if not stopped_at else stopped_at[0] - cpu_before + cpu_after
            result.mosquitto_cpu_s = round(used, 2)
            result.messages_per_s = round((counter.value - messages_before) / (time.monotonic() - begun), 1)
            result.rollout_status = final["status"]
            states = [p["state"] for p in final["devices"].values()]
            result.committed, result.offline = states.count("committed"), states.count("offline")
            result.failed = states.count("failed")
            result.reasons = dict(
                Counter(p["reason"] for p in final["devices"].values() if p["state"] != "committed")
            )
            committed = [d for d, p in final["devices"].items() if p["state"] == "committed"]
            result.events_expected = STATES_PER_DEPLOYMENT * len(committed)

            def received() -> int:
                events = observer.unique_events()
                return sum(1 for e in events if e["device_id"] in committed and e.get("serial") == 1)

            deadline = time.monotonic() + 60
            while received() < result.events_expected and time.monotonic() < deadline:
                time.sleep(0.5)
            result.events_received = received()
            result.refused_downloads = sum(1 for r in server.requests if r.status == 503)
            result.downloaded_mb = round(server.bytes_sent("model.gguf") / 2**20, 2)
            result.stored_mb = _stored_mb(root / "devices")
            collected = root / "collector" / "fleet.db"
            deadline = time.monotonic() + 60  # after a broker restart it may reconnect a little later
            while _collected_events(collected, committed) < result.events_expected:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            collector.send_signal(signal.SIGTERM)
            collector.wait(timeout=120)
            watcher.join()
            result.collect_rss_mb = collector_peak[0]
            result.collect_events = _collected_events(collected, committed)
        finally:
            counter.close()
            observer.close()
            for child in children:
                child.send_signal(signal.SIGTERM)
            for child in children:
                try:
                    child.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    child.kill()
    return result


def _restart_in_last_wave(
    broker: Mosquitto, state_file: Path, result: Result, stopped_at: list[float]
) -> None:
    """Restart the broker once the whole last wave was sent the command, before their answers;
    ``stopped_at`` receives the CPU seconds the first broker process had used."""
    while True:
        time.sleep(0.2)
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError):
            continue
        last = state["waves"][-1]
        if state["next_wave"] == len(state["waves"]) - 1 and all(
            state["devices"].get(d, {}).get("state", "pending") != "pending" for d in last
        ):
            stopped_at.append(sum(psutil.Process(broker.pid).cpu_times()[:2]))
            broker.restart()
            result.notes.append(f"broker restarted at wave {state['next_wave'] + 1} of {len(state['waves'])}")
            return
        if state["status"] != "running":
            return


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, nargs="+", default=[100])
    parser.add_argument("--processes", type=int, default=4, help="device processes (plus one for --faults)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--faults", action="store_true")
    mode.add_argument(
        "--shared-cache", action="store_true", help="one read-only copy of the model, linked by every device"
    )
    parser.add_argument("--rate", type=float, help="immune-fleet rollout --rate (devices a minute)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", nargs="+", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_devices(args.worker)
        return
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # sockets and databases of N devices
    results = []
    for n in args.devices:
        with tempfile.TemporaryDirectory(prefix="fleet-scale-") as tmp:
            console.print(f"[bold]{n} devices[/] ({'with' if args.faults else 'no'} faults)...")
            results.append(measure(n, args.processes, args.faults, Path(tmp), args.rate, args.shared_cache))
            console.print(results[-1])
    table = Table(title=f"fleet scale ({os.cpu_count()} cores){' with faults' if args.faults else ''}")
    columns = [
        ("devices", "devices"), ("start s", "start_s"), ("full status s", "status_full_s"),
        ("status CLI s", "status_cli_s"), ("status CLI MB", "status_cli_rss_mb"),
        ("rollout s", "rollout_s"), ("rollout", "rollout_status"), ("rollout CLI MB", "rollout_rss_mb"),
        ("committed", "committed"), ("offline", "offline"), ("failed", "failed"),
        ("mosquitto CPU s", "mosquitto_cpu_s"), ("msg/s", "messages_per_s"),
        ("events exp/recv", "events"), ("503s", "refused_downloads"), ("devices RSS MB", "devices_rss_mb"),
        ("downloaded MB", "downloaded_mb"), ("stored MB", "stored_mb"), ("collect MB", "collect_rss_mb"),
        ("collected events", "collect_events"),
    ]  # fmt: skip
    for title, _ in columns:
        table.add_column(title)
    for r in results:
        values = {**r.__dict__, "events": f"{r.events_expected}/{r.events_received}"}
        table.add_row(*(str(values[key]) for _, key in columns))
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in results], indent=2))


if __name__ == "__main__":
    main()
