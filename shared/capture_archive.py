"""The operator's archive of captured exchanges (``immune-fleet capture pull`` writes it,
``immune-train prepare --from-capture`` reads it): one SQLite file, mode 0600, each exchange kept once
by its content hash with every (device, model) that produced it, and each device's pull cursor."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from shared.capture import CapturedExchange
from shared.errors import ContractError
from shared.reasons import Reason
from shared.sqlite import immediate_transaction

_SCHEMA = """
CREATE TABLE IF NOT EXISTS exchanges (
    sha256 TEXT PRIMARY KEY,
    body BLOB NOT NULL,
    at TEXT NOT NULL,
    prompt_version TEXT
);
CREATE TABLE IF NOT EXISTS sightings (
    sha256 TEXT NOT NULL REFERENCES exchanges (sha256),
    device TEXT NOT NULL,
    store_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    model_name TEXT NOT NULL,
    model_serial INTEGER,
    model_sha256 TEXT,
    pulled_at TEXT NOT NULL,
    PRIMARY KEY (device, store_id, seq)
);
CREATE TABLE IF NOT EXISTS cursors (
    device TEXT PRIMARY KEY,
    store_id TEXT NOT NULL,
    next_seq INTEGER NOT NULL
);
"""


class ArchiveError(ContractError):
    """The archive file cannot be opened or is not an archive."""


@dataclass(frozen=True)
class Sighting:
    """Where an exchange was captured: which device, and which model answered it there."""

    device: str
    model_name: str
    model_serial: int | None
    model_sha256: str | None


@dataclass(frozen=True)
class ArchivedExchange:
    """One exchange with every place it was seen."""

    sha256: str
    exchange: CapturedExchange
    sightings: tuple[Sighting, ...]


@dataclass(frozen=True)
class Cursor:
    """How far a device's capture store has been pulled."""

    store_id: str
    next_seq: int


class CaptureArchive:
    """The archive; ``create=False`` opens an existing one only (the trainer's side)."""

    def __init__(self, path: Path, create: bool = True) -> None:
        if not create and not path.is_file():
            raise ArchiveError(
                Reason.MISSING_ARCHIVE, f"{path}: no capture archive (run immune-fleet capture pull)"
            )
        self.path = path
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
            path.chmod(0o600)
        try:
            self._conn = sqlite3.connect(path, isolation_level=None)
            self._conn.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise ArchiveError(Reason.BAD_ARCHIVE, f"{path}: not a capture archive ({exc})") from None

    def close(self) -> None:
        self._conn.close()

    def cursor(self, device: str) -> Cursor | None:
        """Where the next pull of ``device`` starts (None: never pulled)."""
        row = self._conn.execute(
            "SELECT store_id, next_seq FROM cursors WHERE device = ?", (device,)
        ).fetchone()
        return None if row is None else Cursor(row[0], int(row[1]))

    def add(self, device: str, store_id: str, exchanges: Sequence[CapturedExchange], next_seq: int) -> int:
        """Keep one pulled chunk and move the device's cursor, in one transaction; how many exchanges
        were new to the archive (one already held from any device is kept once)."""
        pulled_at = datetime.now(UTC).isoformat(timespec="seconds")
        new = 0
        with immediate_transaction(self._conn):
            for exchange in exchanges:
                digest = exchange.content_sha256()
                stored = exchange.model_copy(update={"seq": 0})  # where it was seen is in sightings
                new += self._conn.execute(
                    "INSERT OR IGNORE INTO exchanges (sha256, body, at, prompt_version) VALUES (?, ?, ?, ?)",
                    (digest, stored.to_json(), exchange.at.isoformat(), exchange.prompt_version),
                ).rowcount
                self._conn.execute(
                    "INSERT OR IGNORE INTO sightings VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        digest,
                        device,
                        store_id,
                        exchange.seq,
                        exchange.model_name,
                        exchange.model_serial,
                        exchange.model_sha256,
                        pulled_at,
                    ),
                )
            self._conn.execute(
                "INSERT OR REPLACE INTO cursors (device, store_id, next_seq) VALUES (?, ?, ?)",
                (device, store_id, next_seq),
            )
        return new

    def exchanges(self, prompt_version: str | None = None) -> Iterator[ArchivedExchange]:
        """Every exchange (of one client prompt version, when given), oldest first."""
        query = "SELECT sha256, body FROM exchanges"
        args: tuple[str, ...] = ()
        if prompt_version is not None:
            query, args = query + " WHERE prompt_version = ?", (prompt_version,)
        for digest, body in self._conn.execute(query + " ORDER BY at, sha256", args).fetchall():
            sightings = self._conn.execute(
                "SELECT device, model_name, model_serial, model_sha256 FROM sightings WHERE sha256 = ? "
                "ORDER BY device, seq",
                (digest,),
            ).fetchall()
            yield ArchivedExchange(
                digest, CapturedExchange.from_json(body), tuple(Sighting(*row) for row in sightings)
            )

    def counts(self) -> dict[str, int]:
        """Exchanges per device that has contributed any."""
        rows = self._conn.execute("SELECT device, COUNT(*) FROM sightings GROUP BY device ORDER BY device")
        return {device: int(n) for device, n in rows}
