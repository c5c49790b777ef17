"""The device's capture store: captured exchanges in an SQLite file of their own (mode 0600, under the
service user), bounded by bytes and age with the oldest dropped first, read in chunks for the
operator's pull. It also keeps the redaction map, so a replaced address stays the same placeholder
for as long as the store lives."""

from __future__ import annotations

import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from shared.capture import MAX_EXCHANGE_BYTES, CaptureChunk, CapturedExchange
from shared.sqlite import immediate_transaction

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS exchanges (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    bytes INTEGER NOT NULL,
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS redactions (
    kind TEXT NOT NULL,
    digest TEXT NOT NULL,
    placeholder TEXT NOT NULL,
    PRIMARY KEY (kind, digest)
);
"""


@dataclass(frozen=True)
class CaptureHeld:
    """What a store holds now."""

    store_id: str
    records: int
    bytes: int
    first_seq: int | None
    last_seq: int | None
    oldest_at: float | None
    newest_at: float | None


class CaptureStore:
    """Bounded, append-only (until purged) storage of captured exchanges; thread-safe."""

    def __init__(
        self, path: Path, max_bytes: int, retention: timedelta, clock: Callable[[], float] = time.time
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.retention = retention
        self._clock = clock
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        # Created 0600 before SQLite opens it (SQLite gives its journal the database's mode).
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        path.chmod(0o600)
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10.0)
        # Before the first table: deleted exchanges give their pages back to the file system.
        self._conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        # A capture lost to a power cut costs nothing; an fsync per request would cost the Pi's SD card.
        self._conn.execute("PRAGMA synchronous=OFF")
        self._conn.executescript(_SCHEMA)
        if self._meta("store_id") is None:
            self._new_identity()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # -- identity and redaction map ----------------------------------------------------------------
    def _meta(self, key: str) -> str | None:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def _identity(self, key: str) -> str:
        """``store_id`` or ``secret``, written when the store was made."""
        value = self._meta(key)
        if value is None:
            raise sqlite3.DatabaseError(f"{self.path}: the capture store has no {key}")
        return value

    def _new_identity(self) -> None:
        """A new store id and redaction secret: the placeholders of a purged store mean nothing now."""
        with self._transaction():
            for key, value in (("store_id", secrets.token_hex(16)), ("secret", secrets.token_hex(32))):
                self._conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    @property
    def store_id(self) -> str:
        with self._lock:
            return self._identity("store_id")

    @property
    def secret(self) -> bytes:
        """The key the redaction digests are made with (never leaves the device)."""
        with self._lock:
            return bytes.fromhex(self._identity("secret"))

    def placeholder(self, kind: str, digest: str, make: Callable[[int], str]) -> str:
        """The placeholder of the address whose keyed digest is ``digest``: the one given before, or
        ``make(n)`` for the n-th address of ``kind`` (from 1)."""
        with self._lock, self._transaction():
            row = self._conn.execute(
                "SELECT placeholder FROM redactions WHERE kind = ? AND digest = ?", (kind, digest)
            ).fetchone()
            if row is not None:
                return str(row[0])
            (count,) = self._conn.execute(
                "SELECT COUNT(*) FROM redactions WHERE kind = ?", (kind,)
            ).fetchone()
            value = make(int(count) + 1)
            self._conn.execute(
                "INSERT INTO redactions (kind, digest, placeholder) VALUES (?, ?, ?)", (kind, digest, value)
            )
            return value

    # -- writing -----------------------------------------------------------------------------------
    def _transaction(self) -> AbstractContextManager[None]:
        return immediate_transaction(self._conn)

    def add(self, exchange: CapturedExchange) -> int | None:
        """Store ``exchange``; its sequence number, or None when it is larger than an exchange may be
        or than the whole budget. sqlite3.Error or OSError when the write fails (a full disk)."""
        body = exchange.to_json()
        if len(body) > min(MAX_EXCHANGE_BYTES, self.max_bytes):
            return None
        now = self._clock()
        with self._lock:
            with self._transaction():
                self._expire(now)
                self._make_room(self.max_bytes - len(body))
                cursor = self._conn.execute(
                    "INSERT INTO exchanges (at, bytes, body) VALUES (?, ?, ?)",
                    (exchange.at.timestamp(), len(body), body),
                )
            self._conn.execute("PRAGMA incremental_vacuum")
        return int(cursor.lastrowid or 0)

    def _expire(self, now: float) -> None:
        self._conn.execute("DELETE FROM exchanges WHERE at < ?", (now - self.retention.total_seconds(),))

    def _make_room(self, allowed: int) -> None:
        """Delete the oldest exchanges until at most ``allowed`` bytes are held."""
        (held,) = self._conn.execute("SELECT COALESCE(SUM(bytes), 0) FROM exchanges").fetchone()
        excess = int(held) - allowed
        if excess <= 0:
            return
        doomed, freed = [], 0
        for seq, size in self._conn.execute("SELECT seq, bytes FROM exchanges ORDER BY seq"):
            if freed >= excess:
                break
            doomed.append((seq,))
            freed += size
        self._conn.executemany("DELETE FROM exchanges WHERE seq = ?", doomed)

    def expire(self) -> int:
        """Delete what is past its retention now (a device that captures nothing still forgets)."""
        with self._lock:
            with self._transaction():
                removed = self._conn.execute(
                    "DELETE FROM exchanges WHERE at < ?", (self._clock() - self.retention.total_seconds(),)
                ).rowcount
            self._conn.execute("PRAGMA incremental_vacuum")
        return removed

    def purge(self, up_to_seq: int | None = None) -> int:
        """Delete every exchange (then the redaction map and identity too: a new store), or those up to
        ``up_to_seq``; the number deleted."""
        with self._lock:
            with self._transaction():
                if up_to_seq is None:
                    removed = self._conn.execute("DELETE FROM exchanges").rowcount
                    self._conn.execute("DELETE FROM redactions")
                else:
                    removed = self._conn.execute(
                        "DELETE FROM exchanges WHERE seq <= ?", (up_to_seq,)
                    ).rowcount
            self._conn.execute("PRAGMA incremental_vacuum")
        if up_to_seq is None:
            self._new_identity()
        return removed

    # -- reading -----------------------------------------------------------------------------------
    def chunk(self, after_seq: int, since: datetime | None, max_bytes: int) -> CaptureChunk:
        """The exchanges after ``after_seq`` (not older than ``since``), at most ``max_bytes`` of them
        but always one when any is left."""
        floor = since.timestamp() if since else 0.0
        exchanges: list[CapturedExchange] = []
        used, next_seq, more = 0, after_seq, False
        with self._lock:
            rows = self._conn.execute(
                "SELECT seq, bytes, body FROM exchanges WHERE seq > ? AND at >= ? ORDER BY seq",
                (after_seq, floor),
            )
            for seq, size, body in rows:
                if exchanges and used + size > max_bytes:
                    more = True
                    break
                exchanges.append(CapturedExchange.model_validate_json(body).model_copy(update={"seq": seq}))
                used += size
                next_seq = seq
            store_id = self._identity("store_id")
        return CaptureChunk(store_id=store_id, exchanges=exchanges, next_seq=next_seq, more=more)

    def held(self) -> CaptureHeld:
        """Counts, bytes and the range held."""
        with self._lock:
            row = self._conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(bytes), 0), MIN(seq), MAX(seq), MIN(at), MAX(at) "
                "FROM exchanges"
            ).fetchone()
            store_id = self._identity("store_id")
        return CaptureHeld(store_id, int(row[0]), int(row[1]), row[2], row[3], row[4], row[5])


def utc(ts: float | None) -> str | None:
    """A stored time as ISO 8601 UTC (status answers)."""
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")
