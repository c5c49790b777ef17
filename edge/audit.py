"""The device's audit trail of refusals: every manifest, command, keyring update, MQTT message or
API request it refused, logged at WARNING with its stable reason code and its origin, and counted.

Refusals come from the network, so their volume is an attacker's choice: each (kind, reason,
origin) is logged once per window, and all of them together at most ``burst`` times per window.
What was not logged is counted, and the count is logged with the next line that is; the exact totals
are in ``/metrics`` (``immune_edge_refusals_total{kind,reason}``) and in telemetry."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from enum import StrEnum

from edge.logs import fields
from shared.reasons import Reason

log = logging.getLogger(__name__)

#: Distinct (kind, reason, origin) keys remembered for rate limiting; origins are attacker-chosen,
#: so the table is bounded (the oldest forgotten key just gets logged again).
MAX_KEYS = 512


class RefusalKind(StrEnum):
    MANIFEST = "manifest"
    COMMAND = "command"
    KEYRING = "keyring"
    MESSAGE = "message"  # an MQTT message refused before it was read as one of the above
    API_AUTH = "api-auth"


class Audit:
    """Logs and counts refusals; thread-safe (the MQTT loop, the deploy worker and the API call it)."""

    def __init__(
        self, window_s: float = 60.0, burst: int = 20, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.window_s = window_s
        self.burst = burst
        self._clock = clock
        self._lock = threading.Lock()
        self._counts: Counter[tuple[str, str]] = Counter()
        self._last_logged: OrderedDict[tuple[str, str, str], float] = OrderedDict()
        self._window_start = clock()
        self._logged_in_window = 0
        self._suppressed = 0

    def refused(self, kind: RefusalKind, reason: Reason, origin: str, detail: str, **extra: object) -> None:
        """Record one refusal: ``reason`` is its stable code, ``origin`` where it came from (a topic,
        a client address, a local file), ``detail`` the message; ``extra`` more log fields."""
        now = self._clock()
        key = (kind.value, reason, origin)
        with self._lock:
            self._counts[kind.value, reason] += 1
            if now - self._window_start >= self.window_s:
                self._window_start, self._logged_in_window = now, 0
            last = self._last_logged.get(key)
            if (last is not None and now - last < self.window_s) or self._logged_in_window >= self.burst:
                self._suppressed += 1
                return
            self._last_logged[key] = now
            self._last_logged.move_to_end(key)
            while len(self._last_logged) > MAX_KEYS:
                self._last_logged.popitem(last=False)
            self._logged_in_window += 1
            suppressed, self._suppressed = self._suppressed, 0
        note = f" ({suppressed} more refusals not logged since the last line)" if suppressed else ""
        log.warning(
            "refused %s (%s) from %s: %s%s",
            kind.value,
            reason,
            origin,
            detail,
            note,
            extra=fields(kind=kind.value, reason=reason, origin=origin, **extra),
        )

    def counts(self) -> dict[tuple[str, str], int]:
        """Refusals since start by (kind, reason)."""
        with self._lock:
            return dict(self._counts)

    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())
