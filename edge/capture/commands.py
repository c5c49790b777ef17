"""The operator's capture commands on the device: ``capture_status``, ``capture_pull`` (one chunk per
command) and ``capture_purge``. They run only after the command channel has authenticated the
command (signatures, addressee, expiry, nonce), like every other command."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from edge.capture.recorder import CaptureRecorder
from edge.capture.store import CaptureStore, utc
from edge.config import CaptureSettings
from shared.capture import CaptureChunk, CapturePullAction, CapturePurgeAction
from shared.outcome import Outcome, ResultCode
from shared.reasons import Reason

ResultValue = str | int | float | bool | None


def open_capture_store(settings: CaptureSettings, path: Path) -> CaptureStore | None:
    """The device's capture store: opened when capture is on, or when an earlier run left one (so it
    can still be pulled and purged after capture was turned off); None otherwise."""
    if not settings.enabled and not path.exists():
        return None
    return CaptureStore(path, settings.max_bytes, timedelta(days=settings.retention_days))


class CaptureCommands:
    """Answers the capture commands from ``store`` (None: this device never captured)."""

    def __init__(
        self, settings: CaptureSettings, store: CaptureStore | None, recorder: CaptureRecorder | None = None
    ) -> None:
        self.settings = settings
        self.store = store
        self.recorder = recorder

    def status(self) -> dict[str, ResultValue]:
        """What is held, and how capture is configured."""
        result: dict[str, ResultValue] = {
            "capture_enabled": self.settings.enabled,
            "capture_redact": ",".join(self.settings.redact),
            "capture_max_bytes": self.settings.max_bytes,
        }
        if self.recorder is not None:  # since the daemon started: what a full disk or a slow writer cost
            counts = self.recorder.counts
            result |= {
                "capture_paused": self.recorder.paused,
                "capture_stored": counts.stored,
                "capture_dropped": counts.dropped,
                "capture_failed": counts.failed,
                "capture_too_large": counts.too_large,
            }
        if self.store is None:
            return result | {"capture_records": 0, "capture_bytes": 0}
        held = self.store.held()
        return result | {
            "capture_store": held.store_id,
            "capture_records": held.records,
            "capture_bytes": held.bytes,
            "capture_first_seq": held.first_seq,
            "capture_last_seq": held.last_seq,
            "capture_oldest_at": utc(held.oldest_at),
            "capture_newest_at": utc(held.newest_at),
        }

    def pull(self, action: CapturePullAction) -> tuple[Outcome, CaptureChunk | None]:
        """One chunk after the operator's cursor; from the start when the cursor is of another store."""
        if self.store is None:
            message = "no capture store: capture was never enabled"
            return Outcome(result=ResultCode.FAILED, message=message, reason=Reason.CAPTURE_OFF), None
        after = action.after_seq if action.store_id in (None, self.store.store_id) else 0
        chunk = self.store.chunk(after, action.since, action.max_bytes)
        message = f"{len(chunk.exchanges)} exchange(s) after {after}" + (
            ", more to come" if chunk.more else ""
        )
        return Outcome(result=ResultCode.DONE, message=message), chunk

    def purge(self, action: CapturePurgeAction) -> Outcome:
        """Delete everything, or what the operator holds (up to its cursor in this store)."""
        if self.store is None:
            return Outcome(result=ResultCode.DONE, message="nothing to purge: capture was never enabled")
        if action.up_to_seq is not None and action.store_id != self.store.store_id:
            return Outcome(
                result=ResultCode.FAILED,
                message=f"the capture store is now {self.store.store_id}, not {action.store_id}: "
                "pull again before purging what was pulled",
                reason=Reason.STORE_CHANGED,
            )
        removed = self.store.purge(action.up_to_seq)
        scope = "all" if action.up_to_seq is None else f"up to {action.up_to_seq}"
        return Outcome(result=ResultCode.DONE, message=f"purged {removed} exchange(s) ({scope})")
