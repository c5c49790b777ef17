"""A disk-backed outbox: messages survive broker outages and daemon restarts until the broker acks them.

paho keeps unacknowledged messages in memory only. Everything the device reports is first written
here (in the same place as the state change it reports), then published; a row is deleted only when
the broker's PUBACK arrives. Delivery is at least once; receivers de-duplicate by event id.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from edge.state.db import StateDB

#: Bound on queued rows so a device offline for weeks cannot fill its disk; oldest telemetry-like
#: (coalesced) rows are never many, so in practice this caps deployment events and responses.
MAX_ROWS = 10_000


@dataclass(frozen=True)
class OutboxMessage:
    id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    correlation: bytes | None


class Outbox:
    """Queue of messages waiting for a broker acknowledgement, oldest first."""

    def __init__(self, db: StateDB) -> None:
        self._db = db

    def put(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        correlation: bytes | None = None,
        coalesce_key: str | None = None,
    ) -> None:
        """Queue a message. With ``coalesce_key`` an older unsent message with the same key is replaced
        (used for retained status, where only the latest matters)."""
        with self._db.transaction() as conn:
            if coalesce_key is not None:
                conn.execute("DELETE FROM outbox WHERE coalesce_key = ?", (coalesce_key,))
            conn.execute(
                "INSERT INTO outbox (topic, payload, qos, retain, correlation, coalesce_key, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (topic, payload, qos, int(retain), correlation, coalesce_key, time.time()),
            )
            (count,) = conn.execute("SELECT COUNT(*) FROM outbox").fetchone()
            if count > MAX_ROWS:
                conn.execute(
                    "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox ORDER BY id LIMIT ?)",
                    (count - MAX_ROWS,),
                )

    def pending(self, limit: int, exclude: set[int] | frozenset[int] = frozenset()) -> list[OutboxMessage]:
        """The oldest queued messages not in ``exclude`` (those already handed to the client)."""
        rows = self._db.query("SELECT * FROM outbox ORDER BY id LIMIT ?", (limit + len(exclude),))
        messages = [
            OutboxMessage(
                row["id"], row["topic"], row["payload"], row["qos"], bool(row["retain"]), row["correlation"]
            )
            for row in rows
            if row["id"] not in exclude
        ]
        return messages[:limit]

    def ack(self, message_id: int) -> None:
        """The broker has the message: forget it."""
        with self._db.transaction() as conn:
            conn.execute("DELETE FROM outbox WHERE id = ?", (message_id,))

    def __len__(self) -> int:
        return int(self._db.query("SELECT COUNT(*) FROM outbox")[0][0])
