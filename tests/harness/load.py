"""Clients that keep sending requests to the API, recording every outcome (tests, bench and demo)."""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

ALERT_PROMPT = (
    "Summarise this Slips alert for an analyst in one sentence: horizontal port scan to port 23/TCP "
    "from 192.168.1.113 to 94 hosts, threat level high, confidence 0.9."
)


@dataclass(frozen=True)
class Outcome:
    ok: bool
    status: int
    model: str
    seconds: float
    error: str = ""
    #: time.monotonic() when the request ended, to line a failure up with what happened then
    ended: float = field(default_factory=time.monotonic)


@dataclass
class LoadClients:
    """``clients`` threads, each sending one chat request after another until ``stop()``."""

    base_url: str
    clients: int = 4
    max_tokens: int = 8
    model: str = "slips"
    headers: dict[str, str] = field(default_factory=dict)
    #: What each request asks (a Slips incident in the soak; a one-line alert by default).
    prompt: str = ALERT_PROMPT
    outcomes: list[Outcome] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, name=f"client-{i}", daemon=True) for i in range(self.clients)
        ]

    def __enter__(self) -> LoadClients:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)

    def _run(self) -> None:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "user", "content": self.prompt}],
            "max_tokens": self.max_tokens,
            "temperature": 0,
        }
        with httpx.Client(base_url=self.base_url, timeout=120, headers=self.headers) as client:
            while not self._stop.is_set():
                started = time.perf_counter()
                try:
                    response = client.post("/v1/chat/completions", json=body)
                    seconds = time.perf_counter() - started
                    if response.status_code == 200:
                        data = response.json()
                        ok = isinstance(data["choices"][0]["message"]["content"], str)
                        outcome = Outcome(ok, 200, data["model"], seconds)
                    else:
                        outcome = Outcome(False, response.status_code, "", seconds, response.text[:300])
                except (httpx.HTTPError, ValueError, KeyError) as exc:
                    outcome = Outcome(False, 0, "", time.perf_counter() - started, repr(exc))
                with self._lock:
                    self.outcomes.append(outcome)

    def snapshot(self) -> list[Outcome]:
        with self._lock:
            return list(self.outcomes)

    def failures(self) -> list[Outcome]:
        return [o for o in self.snapshot() if not o.ok]

    def wait_for_requests(self, count: int, timeout: float = 120.0) -> None:
        """Block until ``count`` more requests have finished."""
        target = len(self.snapshot()) + count
        deadline = time.monotonic() + timeout
        while len(self.snapshot()) < target:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(self.snapshot())} of {target} requests finished")
            time.sleep(0.05)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation; 0.0 for no values."""
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[min(max(int(q) - 1, 0), 98)]
