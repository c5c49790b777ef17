"""The operator's SQLite collector: telemetry samples, deployment events and status changes over time,
for `history` and `report`. The embedded default; large fleets feed Telegraf/Prometheus instead
(docs/operations.md)."""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from shared.messages import DeploymentEvent, DeviceStatus, Telemetry

_SCHEMA = """
CREATE TABLE IF NOT EXISTS telemetry (
    device_id TEXT NOT NULL, ts REAL NOT NULL, sample TEXT NOT NULL, PRIMARY KEY (device_id, ts));
CREATE TABLE IF NOT EXISTS events (
    event_id TEXT PRIMARY KEY, device_id TEXT NOT NULL, at TEXT NOT NULL, deployment_id TEXT NOT NULL,
    name TEXT, serial INTEGER, state TEXT NOT NULL, reason TEXT, source TEXT);
CREATE INDEX IF NOT EXISTS events_by_device ON events (device_id, at);
CREATE TABLE IF NOT EXISTS statuses (
    device_id TEXT NOT NULL, at TEXT NOT NULL, online INTEGER NOT NULL, status TEXT NOT NULL,
    PRIMARY KEY (device_id, at));
"""


@dataclass(frozen=True)
class EventRow:
    device_id: str
    at: str
    name: str | None
    serial: int | None
    state: str
    reason: str | None
    source: str | None


class FleetStore:
    """Append-only history; duplicates (at-least-once delivery, retained re-delivery) are ignored."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def add(self, kind: str, message: object) -> None:
        """Record one validated message from the fleet client."""
        with self._lock:
            if isinstance(message, Telemetry):
                self._conn.execute(
                    "INSERT OR IGNORE INTO telemetry VALUES (?, ?, ?)",
                    (message.device_id, message.ts, message.to_json().decode()),
                )
            elif isinstance(message, DeploymentEvent):
                self._conn.execute(
                    "INSERT OR IGNORE INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        message.event_id,
                        message.device_id,
                        message.at.isoformat(),
                        message.deployment_id,
                        message.manifest_name,
                        message.serial,
                        message.state.value,
                        message.reason,
                        message.source,
                    ),
                )
            elif isinstance(message, DeviceStatus):
                self._conn.execute(
                    "INSERT OR IGNORE INTO statuses VALUES (?, ?, ?, ?)",
                    (
                        message.device_id,
                        message.at.isoformat(),
                        int(message.online),
                        message.to_json().decode(),
                    ),
                )

    def events(self, device: str | None = None, limit: int = 200) -> list[EventRow]:
        """Deployment events, newest last."""
        sql = "SELECT device_id, at, name, serial, state, reason, source FROM events"
        params: tuple[object, ...] = ()
        if device is not None:
            sql, params = sql + " WHERE device_id = ?", (device,)
        sql += " ORDER BY at DESC, rowid DESC LIMIT ?"
        with self._lock:
            rows = self._conn.execute(sql, (*params, limit)).fetchall()
        return [EventRow(*row) for row in reversed(rows)]

    def telemetry(self, device: str | None = None) -> dict[str, list[dict[str, object]]]:
        """Samples per device, oldest first."""
        sql, params = "SELECT device_id, sample FROM telemetry", ()
        if device is not None:
            sql, params = sql + " WHERE device_id = ?", (device,)
        with self._lock:
            rows = self._conn.execute(sql + " ORDER BY ts", params).fetchall()
        series: dict[str, list[dict[str, object]]] = {}
        for device_id, sample in rows:
            series.setdefault(device_id, []).append(json.loads(sample))
        return series

    def devices(self) -> list[str]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT device_id FROM telemetry UNION SELECT device_id FROM events "
                "UNION SELECT device_id FROM statuses ORDER BY 1"
            ).fetchall()
        return [row[0] for row in rows]
