"""Client stop sequences, matched on the text as it streams.

The worker matches these itself rather than leaving them to llama-cpp-python, which ends the answer
but does not say which sequence (or the end-of-turn token) ended it; Anthropic's API reports it.
Text that may be the start of a stop sequence is held back until it is known not to be one, so a
streamed answer never shows part of a stop sequence."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StopScanner:
    """Feed text chunks; get back what may be sent now, and the sequence once one matched."""

    stops: tuple[str, ...]
    matched: str | None = None
    _held: str = field(default="", repr=False)

    def feed(self, text: str) -> str:
        """The part of everything fed so far that is safe to send (nothing after a match)."""
        if self.matched is not None:
            return ""
        pending = self._held + text
        hits = [(pending.find(s), s) for s in self.stops if s in pending]
        if hits:
            at, self.matched = min(hits)
            self._held = ""
            return pending[:at]
        keep = max((_overlap(pending, s) for s in self.stops), default=0)
        self._held = pending[len(pending) - keep :] if keep else ""
        return pending[: len(pending) - keep]

    def flush(self) -> str:
        """What is still held back once the answer has ended without a match."""
        held, self._held = self._held, ""
        return held


def _overlap(text: str, stop: str) -> int:
    """Length of the longest end of ``text`` that is a proper start of ``stop``."""
    for size in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:size]):
            return size
    return 0
