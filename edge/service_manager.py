"""Talking to systemd when the daemon runs as ``immune-edge.service`` (Type=notify, WatchdogSec):
READY once serving, STOPPING on shutdown, and watchdog pings from the control loop, so a hung loop
gets the service restarted. Without systemd (or without systemd-python) every call does nothing."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


def _systemd_notify() -> Callable[[str], object] | None:
    if not os.environ.get("NOTIFY_SOCKET"):
        return None
    try:
        from systemd import daemon  # type: ignore[import-not-found]
    except ImportError:
        log.warning("NOTIFY_SOCKET is set but systemd-python is missing: install immune-edge[systemd]")
        return None
    return daemon.notify  # type: ignore[no-any-return]


class ServiceManager:
    """sd_notify through systemd-python; pings at half the watchdog interval systemd asked for."""

    def __init__(self) -> None:
        self._notify = _systemd_notify()
        watchdog_us = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
        watchdog_pid = os.environ.get("WATCHDOG_PID")
        mine = watchdog_pid is None or watchdog_pid == str(os.getpid())
        self.ping_interval_s = watchdog_us / 2e6 if watchdog_us > 0 and mine else None
        self._last_ping = 0.0

    def ready(self, status: str) -> None:
        """Tell systemd start-up is complete (and what the daemon is doing)."""
        self._send(f"READY=1\nSTATUS={status}")

    def status(self, status: str) -> None:
        self._send(f"STATUS={status}")

    def stopping(self) -> None:
        self._send("STOPPING=1")

    def tick(self) -> None:
        """Called from the control loop: a watchdog ping when one is due."""
        if self.ping_interval_s is None:
            return
        now = time.monotonic()
        if now - self._last_ping >= self.ping_interval_s:
            self._last_ping = now
            self._send("WATCHDOG=1")

    def _send(self, message: str) -> None:
        if self._notify is not None:
            self._notify(message)
