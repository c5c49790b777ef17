"""What is installed and running: cached models, the current/previous pointers, the pin, the
anti-rollback serials and every deployment's state. All changes are single SQLite transactions, so a
pointer switch is atomic and survives power loss."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
import uuid
from dataclasses import dataclass
from enum import StrEnum

from edge.state.db import StateDB
from shared.admission import read_manifest_unverified
from shared.errors import SchemaError
from shared.manifest import Manifest
from shared.messages import DeploymentState
from shared.reasons import Reason


def slot_of(manifest: Manifest) -> str:
    """The pointer slot of a manifest: "" for a model, its name for an adapter."""
    return manifest.name if manifest.is_adapter else ""


class ChangeKind(StrEnum):
    """What a deployment row changes: which go-live it gets and how a restart resumes it."""

    #: A new base model version from a signed manifest: raises the serial floor, gets a trial.
    MODEL = "model"
    #: A new version of a LoRA adapter (its own pointers): raises the floor, gets a trial.
    ADAPTER = "adapter"
    #: An operator rollback to a cached version: the floor stays, no trial, ends rolled_back.
    ROLLBACK = "rollback"
    #: An operator pin to a cached serial: as a rollback, but ends committed and sets the pin.
    PIN = "pin"


_POINTERS = ("current", "previous")


def _pointer_key(which: str, slot: str) -> str:
    return f"{which}:{slot}" if slot else which


@dataclass(frozen=True)
class InstalledModel:
    """A verified model in the store, with the signed envelope it came from and its manifest."""

    manifest: Manifest
    envelope: bytes
    installed_at: float

    @property
    def channel(self) -> str:
        return self.manifest.channel

    @property
    def serial(self) -> int:
        return self.manifest.serial

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def model_sha256(self) -> str:
        return self.manifest.model_file.sha256

    @property
    def digests(self) -> tuple[str, ...]:
        return tuple(entry.sha256 for entry in self.manifest.files)

    @property
    def key(self) -> tuple[str, int]:
        """(channel, serial): how the runtime and the pointers name a model."""
        return (self.channel, self.serial)

    @property
    def slot(self) -> str:
        """Which current/previous pointers the model moves: "" for the base model, the adapter's
        name for a LoRA adapter (each adapter name has its own)."""
        return slot_of(self.manifest)


class _Manifests:
    """Each stored envelope's manifest, parsed once per process: the verified one when the model was
    added, else (after a restart) its row's, read once. The envelope was verified before its row
    was written, and the state directory is the service's own."""

    def __init__(self) -> None:
        self._by_digest: dict[str, Manifest] = {}

    def remember(self, model: InstalledModel) -> None:
        self._by_digest[hashlib.sha256(model.envelope).hexdigest()] = model.manifest

    def model(self, row: sqlite3.Row) -> InstalledModel:
        envelope: bytes = row["envelope"]
        digest = hashlib.sha256(envelope).hexdigest()
        manifest = self._by_digest.get(digest)
        if manifest is None:
            manifest = read_manifest_unverified(envelope)
            if manifest is None:
                raise SchemaError(
                    Reason.STATE_CORRUPT,
                    f"state.db: the stored manifest of serial {row['serial']} is unreadable",
                )
            self._by_digest[digest] = manifest
        return InstalledModel(manifest, envelope, row["installed_at"])


@dataclass(frozen=True)
class Deployment:
    """One attempt to install a manifest, from whichever source it came."""

    id: str
    source: str
    name: str | None
    channel: str | None
    serial: int | None
    envelope: bytes | None
    state: DeploymentState
    reason: str | None
    #: How many times a restart interrupted this deployment's activation or trial.
    interruptions: int = 0
    kind: ChangeKind = ChangeKind.MODEL

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Deployment:
        return cls(
            row["id"],
            row["source"],
            row["name"],
            row["channel"],
            row["serial"],
            row["envelope"],
            DeploymentState(row["state"]),
            row["reason"],
            row["interruptions"],
            ChangeKind(row["kind"]),
        )


class Ledger:
    """Installed models, pointers and deployments in the state database."""

    def __init__(self, db: StateDB) -> None:
        self.db = db
        self._manifests = _Manifests()

    # -- settings ---------------------------------------------------------------------------
    def _get(self, key: str) -> str | None:
        rows = self.db.query("SELECT value FROM settings WHERE key = ?", (key,))
        return rows[0]["value"] if rows else None

    def _set(self, conn: sqlite3.Connection, key: str, value: str | None) -> None:
        if value is None:
            conn.execute("DELETE FROM settings WHERE key = ?", (key,))
        else:
            conn.execute(
                "INSERT INTO settings (key, value) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    # -- models -----------------------------------------------------------------------------
    def add_model(self, model: InstalledModel) -> None:
        self._manifests.remember(model)
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO models VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    model.channel,
                    model.serial,
                    model.name,
                    model.envelope,
                    model.model_sha256,
                    json.dumps(list(model.digests)),
                    model.installed_at,
                ),
            )

    def models(self) -> list[InstalledModel]:
        """Cached models, newest install first."""
        rows = self.db.query("SELECT * FROM models ORDER BY installed_at DESC, serial DESC")
        return [self._manifests.model(row) for row in rows]

    def model(self, channel: str, serial: int) -> InstalledModel | None:
        rows = self.db.query("SELECT * FROM models WHERE channel = ? AND serial = ?", (channel, serial))
        return self._manifests.model(rows[0]) if rows else None

    def find_serial(self, serial: int, slot: str = "") -> InstalledModel | None:
        """A cached model (or, with ``slot``, a version of that adapter) with this serial: the most
        recently installed, should channels share serials."""
        rows = self.db.query("SELECT * FROM models WHERE serial = ? ORDER BY installed_at DESC", (serial,))
        return next((m for m in map(self._manifests.model, rows) if m.slot == slot), None)

    def forget_models(self, keys: list[tuple[str, int]]) -> None:
        with self.db.transaction() as conn:
            conn.executemany("DELETE FROM models WHERE channel = ? AND serial = ?", keys)

    # -- pointers ---------------------------------------------------------------------------
    def _pointer(self, which: str, slot: str) -> InstalledModel | None:
        value = self._get(_pointer_key(which, slot))
        if value is None:
            return None
        channel, serial = json.loads(value)
        return self.model(channel, serial)

    def current(self, slot: str = "") -> InstalledModel | None:
        """The model (or, with ``slot``, the adapter of that name) being served."""
        return self._pointer("current", slot)

    def previous(self, slot: str = "") -> InstalledModel | None:
        return self._pointer("previous", slot)

    def adapter_slots(self) -> list[str]:
        """The adapter names with a current pointer."""
        rows = self.db.query("SELECT key FROM settings WHERE key LIKE 'current:%' ORDER BY key")
        return [row["key"].removeprefix("current:") for row in rows]

    def switch_to(self, model: InstalledModel, accept_serial: bool) -> InstalledModel | None:
        """Make ``model`` current in its slot and the old current previous, in one transaction;
        return the old one.

        ``accept_serial`` raises the channel's anti-rollback floor to this serial (a normal rollout);
        an operator rollback leaves the floor where it is.
        """
        slot = model.slot
        with self.db.transaction() as conn:
            old = self.current(slot)
            if old is not None and (old.channel, old.serial) != (model.channel, model.serial):
                self._set(conn, _pointer_key("previous", slot), json.dumps([old.channel, old.serial]))
            self._set(conn, _pointer_key("current", slot), json.dumps([model.channel, model.serial]))
            if accept_serial and model.serial > self.last_serial(model.channel):
                self._set(conn, f"last_serial:{model.channel}", str(model.serial))
        return old

    def set_pointers(
        self, slot: str, current: InstalledModel | None, previous: InstalledModel | None
    ) -> None:
        """Put both pointers of ``slot`` exactly as given, in one transaction (after a failed go-live:
        what they were before it; None clears one)."""
        with self.db.transaction() as conn:
            for which, model in (("current", current), ("previous", previous)):
                value = json.dumps([model.channel, model.serial]) if model is not None else None
                self._set(conn, _pointer_key(which, slot), value)

    def pointed(self) -> list[InstalledModel]:
        """Every model a current or previous pointer of any slot refers to."""
        models = (self._pointer(which, slot) for slot in ["", *self.adapter_slots()] for which in _POINTERS)
        return [m for m in models if m is not None]

    def in_use(self) -> set[str]:
        """Digests the pointers of every slot refer to: never deleted."""
        return {digest for model in self.pointed() for digest in model.digests}

    # -- anti-rollback, pin, handled desired state --------------------------------------------
    def last_serial(self, channel: str) -> int:
        """The highest serial accepted on ``channel`` (0 when none)."""
        value = self._get(f"last_serial:{channel}")
        return int(value) if value is not None else 0

    @property
    def pinned(self) -> bool:
        return self._get("pinned") == "1"

    def set_pinned(self, pinned: bool) -> None:
        with self.db.transaction() as conn:
            self._set(conn, "pinned", "1" if pinned else None)

    def mark_bad(self, channel: str, serial: int, reason: str) -> None:
        """Remember that this serial failed for a model fault (or too many interruptions)."""
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO bad_serials (channel, serial, reason) VALUES (?, ?, ?)",
                (channel, serial, reason[:1024]),
            )

    def bad_serials(self) -> dict[tuple[str, int], str]:
        """Every serial marked bad on this device, with why."""
        rows = self.db.query("SELECT channel, serial, reason FROM bad_serials")
        return {(row["channel"], row["serial"]): row["reason"] for row in rows}

    def count_interruption(self, deployment_id: str) -> int:
        """One more restart interrupted this deployment's activation; returns the new count."""
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE deployments SET interruptions = interruptions + 1 WHERE id = ?", (deployment_id,)
            )
            row = conn.execute(
                "SELECT interruptions FROM deployments WHERE id = ?", (deployment_id,)
            ).fetchone()
        return int(row["interruptions"]) if row else 0

    def handled(self, level: str) -> str | None:
        """Digest of the desired-state envelope last acted on for a topic level."""
        return self._get(f"handled:{level}")

    def mark_handled(self, level: str, digest: str | None) -> None:
        with self.db.transaction() as conn:
            self._set(conn, f"handled:{level}", digest)

    # -- deployments --------------------------------------------------------------------------
    def new_deployment(
        self, source: str, envelope: bytes | None, kind: ChangeKind = ChangeKind.MODEL
    ) -> Deployment:
        deployment = Deployment(
            uuid.uuid4().hex, source, None, None, None, envelope, DeploymentState.QUEUED, None, kind=kind
        )
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT INTO deployments (id, source, envelope, state, updated_at, kind) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (deployment.id, source, envelope, deployment.state.value, time.time(), kind.value),
            )
        return deployment

    def describe_deployment(
        self, deployment_id: str, name: str, channel: str, serial: int, kind: ChangeKind
    ) -> None:
        """What the row changes, once the manifest is verified (a rejected one stays undescribed)."""
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE deployments SET name = ?, channel = ?, serial = ?, kind = ? WHERE id = ?",
                (name, channel, serial, kind.value, deployment_id),
            )

    def set_state(self, deployment_id: str, state: DeploymentState, reason: str | None) -> None:
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE deployments SET state = ?, reason = ?, updated_at = ? WHERE id = ?",
                (state.value, reason, time.time(), deployment_id),
            )

    def deployment(self, deployment_id: str) -> Deployment | None:
        rows = self.db.query("SELECT * FROM deployments WHERE id = ?", (deployment_id,))
        return Deployment.from_row(rows[0]) if rows else None

    def unfinished(self) -> list[Deployment]:
        """Deployments a crash or restart interrupted, oldest first."""
        terminal = tuple(s.value for s in DeploymentState if s.terminal)
        rows = self.db.query(
            f"SELECT * FROM deployments WHERE state NOT IN ({','.join('?' * len(terminal))}) "  # noqa: S608
            "ORDER BY updated_at",
            terminal,
        )
        return [Deployment.from_row(row) for row in rows]

    def last_deployment(self) -> Deployment | None:
        rows = self.db.query("SELECT * FROM deployments ORDER BY updated_at DESC LIMIT 1")
        return Deployment.from_row(rows[0]) if rows else None
