"""Where the daemon's log lines go, and the structured fields they carry.

systemd connects a service's stderr to the journal and says so in ``JOURNAL_STREAM`` (the
``device:inode`` of that stream). Only then are lines sent to journald natively, with their
structured fields (``journalctl -u immune-edge REASON=bad-signature``). Anywhere else (a terminal,
a container, the demo, a test) lines go to stderr: text with time and level, or one JSON object
per line for collectors. Picking journald merely because systemd-python imports would drop every
line on a machine without a journal.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Protocol

#: The structured fields events may carry, in the order text lines show them. Journal field names
#: are these in upper case.
FIELDS = ("device", "deployment", "serial", "state", "kind", "reason", "origin", "topic", "nonce", "request")
SYSLOG_IDENTIFIER = "immune-edge"


class SupportsFileno(Protocol):
    def fileno(self) -> int: ...


class LogFormat(StrEnum):
    """``--log-format``: ``auto`` is journald under systemd, else text."""

    AUTO = "auto"
    TEXT = "text"
    JSON = "json"
    JOURNAL = "journal"


def fields(**values: object) -> dict[str, object]:
    """``extra=`` for a log call: the structured fields of an event (None values left out)."""
    unknown = set(values) - set(FIELDS)
    if unknown:
        raise ValueError(f"unknown log fields: {', '.join(sorted(unknown))}")
    return {name.upper(): value for name, value in values.items() if value is not None}


def record_fields(record: logging.LogRecord) -> dict[str, object]:
    """The structured fields a record carries, by their lower-case names."""
    return {name: record.__dict__[name.upper()] for name in FIELDS if name.upper() in record.__dict__}


def journal_stream_matches(environ: Mapping[str, str], stream: SupportsFileno) -> bool:
    """Whether ``stream`` is the one systemd connected to the journal (``JOURNAL_STREAM``)."""
    expected = environ.get("JOURNAL_STREAM", "")
    device, _, inode = expected.partition(":")
    if not device.isdigit() or not inode.isdigit():
        return False
    try:
        info = os.fstat(stream.fileno())
    except (OSError, ValueError):  # closed, or not a real file (a test's capture)
        return False
    return (info.st_dev, info.st_ino) == (int(device), int(inode))


def _journal_handler() -> logging.Handler | None:
    """systemd-python's handler: it sends a record's attributes as journal fields, so the
    upper-case names of :func:`fields` arrive as REASON=..., TOPIC=... (journald ignores the
    lower-case ones)."""
    try:
        from systemd.journal import JournalHandler  # type: ignore[import-not-found]
    except ImportError:
        return None
    return JournalHandler(SYSLOG_IDENTIFIER=SYSLOG_IDENTIFIER)


class TextFormatter(logging.Formatter):
    """``2026-11-30T07:55:00.123Z WARNING edge.daemon: message [reason=... topic=...]``."""

    def format(self, record: logging.LogRecord) -> str:
        at = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        line = f"{at.replace('+00:00', 'Z')} {record.levelname} {record.name}: {record.getMessage()}"
        if extra := record_fields(record):
            line += " [" + " ".join(f"{k}={v}" for k, v in extra.items()) + "]"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, the structured fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **record_fields(record),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def choose_format(
    requested: LogFormat, environ: Mapping[str, str] = os.environ, stream: SupportsFileno | None = None
) -> LogFormat:
    """The format ``requested`` resolves to here: ``auto`` means journal only when stderr is
    systemd's journal stream and systemd-python is installed, text otherwise."""
    if requested is not LogFormat.AUTO:
        return requested
    under_journal = journal_stream_matches(environ, stream or sys.stderr)
    return LogFormat.JOURNAL if under_journal and _journal_handler() is not None else LogFormat.TEXT


class _DeviceField(logging.Filter):
    """Every line of a daemon carries its device id (``DEVICE=`` in the journal), so logs gathered
    from many Pis can be told apart."""

    def __init__(self, device: str) -> None:
        super().__init__()
        self.device = device

    def filter(self, record: logging.LogRecord) -> bool:
        record.__dict__.setdefault("DEVICE", self.device)
        return True


def setup_logging(
    verbose: bool = False, requested: LogFormat = LogFormat.AUTO, device: str | None = None
) -> LogFormat:
    """Configure the root logger (``device``: the id every line carries); returns the format
    chosen. A ``journal`` request on a machine without systemd-python falls back to text on stderr,
    with a warning."""
    chosen = choose_format(requested)
    handler = _journal_handler() if chosen is LogFormat.JOURNAL else None
    fell_back = chosen is LogFormat.JOURNAL and handler is None
    if handler is None:
        chosen = LogFormat.TEXT if fell_back else chosen
        handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter() if chosen is LogFormat.JSON else TextFormatter())
    if device is not None:
        handler.addFilter(_DeviceField(device))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler], force=True)
    if fell_back:
        logging.getLogger(__name__).warning("journald logging needs systemd-python: logging to stderr")
    return chosen
