"""A positive signal from a daemon running in this process: wait for one of its log lines, instead
of sleeping and hoping that what was to happen has happened."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class LogWatch(logging.Handler):
    """Collects the messages of one logger (and its children), from any thread."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []
        self._changed = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        with self._changed:
            self.messages.append(record.getMessage())
            self._changed.notify_all()

    def count(self, needle: str) -> int:
        with self._changed:
            return sum(needle in message for message in self.messages)

    def wait_for(self, needle: str, after: int = 0, timeout: float = 30.0) -> None:
        """Wait until more than ``after`` messages contain ``needle``."""
        with self._changed:
            if not self._changed.wait_for(lambda: self.count(needle) > after, timeout):
                raise AssertionError(f"no log line with {needle!r} within {timeout:.0f} s")


@contextmanager
def watching(logger_name: str) -> Iterator[LogWatch]:
    """Watch ``logger_name`` at DEBUG for the duration of the block."""
    logger = logging.getLogger(logger_name)
    watch, level = LogWatch(), logger.level
    logger.addHandler(watch)
    logger.setLevel(logging.DEBUG)
    try:
        yield watch
    finally:
        logger.removeHandler(watch)
        logger.setLevel(level)
