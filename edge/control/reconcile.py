"""Desired-state reconciliation: retained desired state arrives for the fleet, the device's groups
and the device itself, in any order after a (re)connect. After it settles, the most specific level
wins (device > group > fleet), for the model and for each adapter on its own: a base set for one
device and the fleet's adapters all apply. What was already acted on is not acted on again; a
transient failure is retried later; a pinned device waits. An adapter refused because the device
serves another base is acted on again once the base changes: adapters may be published before the
base they need reaches every device."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable

from edge.control.deployer import Deployer
from shared.admission import read_manifest_unverified
from shared.outcome import Outcome
from shared.reasons import Reason
from shared.topics import TopicKind, TopicRef

log = logging.getLogger(__name__)

DESIRED_KINDS = frozenset({TopicKind.DESIRED_FLEET, TopicKind.DESIRED_GROUP, TopicKind.DESIRED_DEVICE})
MODEL_SLOT = "model"


def envelope_digest(envelope: bytes) -> str:
    """Identity of a received envelope, for recognising redelivered retained messages."""
    return hashlib.sha256(envelope).hexdigest()


def slot_of(envelope: bytes) -> str:
    """What a desired-state message sets: the model, or one adapter by name. Read unverified, which
    is safe: it only decides which earlier message this one replaces (a forged one can displace no
    more than before, when it replaced the whole level); the deployer verifies before acting."""
    manifest = read_manifest_unverified(envelope)
    if manifest is None or manifest.base is None:
        return MODEL_SLOT
    return f"adapter:{manifest.name}"


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
        #: level -> slot (the model, or an adapter) -> the envelope last received for it
        self._by_level: dict[str, dict[str, bytes]] = {}
        self._settle_until: float | None = None
        self._retry_at: float | None = None
        self._queued = False

    def received(self, ref: TopicRef, payload: bytes) -> None:
        """A desired-state message (an empty payload clears that level's retained state)."""
        level = level_of(ref)
        with self._lock:
            if payload:
                self._by_level.setdefault(level, {})[slot_of(payload)] = payload
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
            return [envelope for slots in self._by_level.values() for envelope in slots.values()]

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

    def _effective(self) -> list[tuple[str, str, bytes]]:
        """(level, slot, envelope) per slot from its most specific level; the model first, since an
        adapter needs its base."""
        levels = ("device", *(f"group:{g}" for g in self.groups), "fleet")
        slots = sorted(
            {slot for held in self._by_level.values() for slot in held}, key=lambda s: (s != MODEL_SLOT, s)
        )
        chosen = []
        for slot in slots:
            level = next(level for level in levels if slot in self._by_level.get(level, {}))
            chosen.append((level, slot, self._by_level[level][slot]))
        return chosen

    def reconcile(self) -> list[Outcome]:
        """Deploy, per slot, the most specific desired state unless it was already acted on or the
        device is pinned; returns the outcomes of what was deployed."""
        with self._lock:
            self._queued = False
            chosen = self._effective()
        ledger = self.deployer.ledger
        outcomes = []
        for level, slot, envelope in chosen:
            # The model's key is the level alone, as before adapters had slots of their own.
            key = level if slot == MODEL_SLOT else f"{level}/{slot}"
            digest = envelope_digest(envelope)
            current = ledger.current()  # read per slot: the model may have changed in this pass
            waiting = f"{digest} waits for a base other than {current.model_sha256 if current else 'none'}"
            if ledger.handled(key) in (digest, waiting):
                log.debug("desired state from %s (%s) was already acted on", level, slot)
                continue
            if ledger.pinned:
                log.info("pinned: not acting on new desired state from %s", level)
                break
            outcome = self.deployer.deploy(envelope, source=f"desired:{level}")
            outcomes.append(outcome)
            if outcome.transient:
                with self._lock:
                    self._retry_at = self._clock() + self.retry_failed_s
                log.info("will retry the desired state from %s in %.0f s", level, self.retry_failed_s)
            else:
                ledger.mark_handled(key, waiting if outcome.reason == Reason.BASE_MISMATCH else digest)
        return outcomes
