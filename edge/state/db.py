"""The SQLite state database: opened in WAL mode, shared by the daemon's threads behind one lock."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SCHEMA_VERSION = 3

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    correlation BLOB,
    coalesce_key TEXT UNIQUE,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS models (
    channel TEXT NOT NULL,
    serial INTEGER NOT NULL,
    name TEXT NOT NULL,
    envelope BLOB NOT NULL,
    model_sha256 TEXT NOT NULL,
    digests TEXT NOT NULL,
    installed_at REAL NOT NULL,
    PRIMARY KEY (channel, serial)
);
CREATE TABLE IF NOT EXISTS settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS deployments (
    id TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    name TEXT,
    channel TEXT,
    serial INTEGER,
    envelope BLOB,
    envelope_sha256 TEXT,
    state TEXT NOT NULL,
    reason TEXT,
    updated_at REAL NOT NULL,
    interruptions INTEGER NOT NULL DEFAULT 0,
    kind TEXT NOT NULL DEFAULT 'model'
);
CREATE TABLE IF NOT EXISTS bad_serials (
    channel TEXT NOT NULL,
    serial INTEGER NOT NULL,
    reason TEXT NOT NULL,
    PRIMARY KEY (channel, serial)
);
CREATE TABLE IF NOT EXISTS nonces (
    nonce TEXT PRIMARY KEY,
    expires_at REAL NOT NULL
);
"""


class StateDB:
    """One connection, serialised by a lock; each ``transaction()`` commits or rolls back as a whole."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        self.path = path
        self._lock = threading.RLock()
        self._depth = 0  # transaction nesting of the thread holding the lock
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30.0)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed event or pointer switch survives power loss, which a Pi sees often.
        self._conn.execute("PRAGMA synchronous=FULL")
        # executescript commits on its own, so the idempotent schema runs outside transaction().
        self._conn.executescript(_SCHEMA)
        self._migrate()
        self._conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _migrate(self) -> None:
        """Bring a state database written by an older version up to this schema."""
        columns = {row["name"] for row in self._conn.execute("PRAGMA table_info(deployments)")}
        if "interruptions" not in columns:  # version 1: activations interrupted by a restart not counted
            self._conn.execute("ALTER TABLE deployments ADD COLUMN interruptions INTEGER NOT NULL DEFAULT 0")
        if "kind" not in columns:  # version 2: every row was a new model or adapter (operator changes too)
            self._conn.execute("ALTER TABLE deployments ADD COLUMN kind TEXT NOT NULL DEFAULT 'model'")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """Run statements atomically (BEGIN IMMEDIATE, so a second process waits instead of failing).

        Nested calls join the outer transaction, so a state change and the outbox event that reports
        it commit together.
        """
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield self._conn
                finally:
                    self._depth -= 1
                return
            self._conn.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            finally:
                self._depth = 0
            self._conn.execute("COMMIT")

    def query(self, sql: str, params: tuple[object, ...] = ()) -> list[sqlite3.Row]:
        """Read rows outside an explicit transaction."""
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def close(self) -> None:
        with self._lock:
            self._conn.close()
