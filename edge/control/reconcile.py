"""Desired-state reconciliation: retained desired state arrives for the fleet, the device's groups
and the device itself, in any order after a (re)connect. After it settles, the most specific level
wins (device > group > fleet); a level already acted on is not acted on again; a transient failure
is retried later; a pinned device waits."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable

from edge.control.deployer import Deployer
from shared.outcome import Outcome
from shared.topics import TopicKind, TopicRef

log = logging.getLogger(__name__)

DESIRED_KINDS = frozenset({TopicKind.DESIRED_FLEET, TopicKind.DESIRED_GROUP, TopicKind.DESIRED_DEVICE})


def envelope_digest(envelope: bytes) -> str:
    """Identity of a received envelope, for recognising redelivered retained messages."""
    return hashlib.sha256(envelope).hexdigest()


def level_of(ref: TopicRef) -> str:
    """The precedence level a desired-state topic belongs to."""
    if ref.kind is TopicKind.DESIRED_DEVICE:
        return "device"
    if ref.kind is TopicKind.DESIRED_GROUP:
        return f"group:{ref.group}"
    return "fleet"


class Reconciler:
    """Holds the desired state by level and decides when, and what, to deploy."""

    def __init__(
        self,
        deployer: Deployer,
        groups: tuple[str, ...],
        settle_s: float,
        retry_failed_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.deployer = deployer
        self.groups = groups
        self.settle_s = settle_s
        self.retry_failed_s = retry_failed_s
        self._clock = clock
        self._lock = threading.Lock()
        self._by_level: dict[str, bytes] = {}
        self._settle_until: float | None = None
        self._retry_at: float | None = None
        self._queued = False

    def received(self, ref: TopicRef, payload: bytes) -> None:
        """A desired-state message (an empty payload clears that level's retained state)."""
        level = level_of(ref)
        with self._lock:
            if payload:
                self._by_level[level] = payload
            else:
                self._by_level.pop(level, None)
            self._settle_until = self._clock() + self.settle_s

    def changed(self) -> None:
        """Something outside the desired state changed (keyring adopted, device unpinned): act now."""
        with self._lock:
            self._settle_until = self._clock()
            self._retry_at = None

    def wanted_envelopes(self) -> list[bytes]:
        """Every desired envelope held: their files are kept by garbage collection."""
        with self._lock:
            return list(self._by_level.values())

    def take_due(self) -> bool:
        """Whether a reconciliation should be queued now; at most one is queued at a time."""
        now = self._clock()
        with self._lock:
            due = [t for t in (self._settle_until, self._retry_at) if t is not None]
            if not due or min(due) > now or self._queued:
                return False
            self._settle_until = self._retry_at = None
            self._queued = True
            return True

    def _effective(self) -> tuple[str, bytes] | None:
        for level in ("device", *(f"group:{g}" for g in self.groups), "fleet"):
            if level in self._by_level:
                return level, self._by_level[level]
        return None

    def reconcile(self) -> Outcome | None:
        """Deploy the most specific desired state unless it was already acted on or the device is
        pinned; returns the deployment's outcome, or None when nothing was done."""
        with self._lock:
            self._queued = False
            chosen = self._effective()
        if chosen is None:
            return None
        level, envelope = chosen
        ledger = self.deployer.ledger
        digest = envelope_digest(envelope)
        if ledger.handled(level) == digest:
            return None
        if ledger.pinned:
            log.info("pinned: not acting on new desired state from %s", level)
            return None
        outcome = self.deployer.deploy(envelope, source=f"desired:{level}")
        if outcome.transient:
            with self._lock:
                self._retry_at = self._clock() + self.retry_failed_s
            log.info("will retry the desired state from %s in %.0f s", level, self.retry_failed_s)
        else:
            ledger.mark_handled(level, digest)
        return outcome
