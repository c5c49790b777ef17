"""Replay protection for operator commands: every nonce is remembered until its command expires."""

from __future__ import annotations

import sqlite3
from datetime import datetime

from edge.state.db import StateDB


class NonceStore:
    """Persistent set of used command nonces; entries expire with their command."""

    def __init__(self, db: StateDB) -> None:
        self._db = db

    def claim(self, nonce: str, expires_at: datetime, now: datetime) -> bool:
        """Record ``nonce``; False when it was already used (a replay). Prunes expired nonces."""
        with self._db.transaction() as conn:
            conn.execute("DELETE FROM nonces WHERE expires_at < ?", (now.timestamp(),))
            try:
                conn.execute(
                    "INSERT INTO nonces (nonce, expires_at) VALUES (?, ?)", (nonce, expires_at.timestamp())
                )
            except sqlite3.IntegrityError:
                return False
        return True
