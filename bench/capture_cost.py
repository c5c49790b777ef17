"""What capture costs the request path: the same Slips alert-summary-v2 final requests (rendered from the
real incidents of ../shared/datasets/slips) sent alternately to two in-process data planes serving the
same SmolLM2 GGUF, one with ``[capture]`` off and one with capture on (every request, IPv4 and MAC
redaction). Reported: median time to first token and decode tokens/s of each, their ratios (on / off),
and the recorder's own work per exchange (redaction and the SQLite write, on its thread).

Run: .venv/bin/python -m bench.capture_cost [--requests 12] [--max-tokens 48]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from edge.assembly import DataPlane, HostPaths
from edge.capture.recorder import CaptureRecorder
from edge.capture.store import CaptureStore
from edge.config import ApiSettings, CaptureSettings, RuntimeSettings, ThermalSettings
from shared.manifest import RuntimeProfile
from tests.harness.models import smollm2_gguf
from tests.harness.net import free_port
from tests.harness.slips_prompts import DATASET
from trainer.dataset.profiled import facts_of
from trainer.dataset.slips import SlipsIncident, load_slips_file
from trainer.prompts.alert_summary import AlertSummaryProfile

console = Console(width=140)
PROFILE = RuntimeProfile(chat_format="chatml", n_ctx=4096)


def slips_requests(count: int, max_estimate: int) -> list[list[dict[str, str]]]:
    """The final requests Slips would send for the first ``count`` real incidents whose request is at
    most ``max_estimate`` tokens in Slips' estimate."""
    profile = AlertSummaryProfile()
    requests = []
    for raw in load_slips_file(DATASET):
        try:
            facts = facts_of(SlipsIncident.model_validate(raw))
        except ValueError:
            continue
        final = profile.requests(facts, lambda request, facts: "")[-1]
        if final.estimated_tokens <= max_estimate:
            requests.append(final.messages)
        if len(requests) == count:
            return requests
    return requests


class Plane:
    """An in-process data plane on a free port, with or without a capture recorder."""

    def __init__(self, model: Path, capture: CaptureRecorder | None) -> None:
        self.port = free_port()
        api = ApiSettings(host="127.0.0.1", port=self.port, socket=None, max_tokens_cap=512)
        host = HostPaths()
        self.plane = DataPlane(
            api, RuntimeSettings(n_threads=1), ThermalSettings(), None, host, capture=capture
        )
        self.plane.start()
        self.plane.runtime.serve_file(model, "slips", PROFILE)
        self.url = f"http://127.0.0.1:{self.port}"

    def ask(self, messages: list[dict[str, str]], max_tokens: int) -> tuple[float, float]:
        """(seconds to the first token, decode tokens/s) of one streamed request."""
        body: dict[str, Any] = {
            "model": "slips",
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stream": True,
        }
        started = time.perf_counter()
        first = last = 0.0
        tokens = 0
        with httpx.stream("POST", f"{self.url}/v1/chat/completions", json=body, timeout=600) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                delta = json.loads(line[6:])["choices"][0].get("delta", {})
                if not delta.get("content"):  # the opening role chunk, the closing finish chunk
                    continue
                last = time.perf_counter()
                first = first or last
                tokens += 1
        decode = (tokens - 1) / (last - first) if tokens > 1 and last > first else 0.0
        return first - started, decode

    def close(self) -> None:
        self.plane.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--max-estimate", type=int, default=1500, help="Longest request, in Slips' estimate.")
    args = parser.parse_args()
    requests = slips_requests(args.requests, args.max_estimate)
    model = smollm2_gguf()
    with tempfile.TemporaryDirectory() as tmp:
        settings = CaptureSettings(enabled=True, redact=["ipv4", "mac"])
        store = CaptureStore(Path(tmp) / "capture.db", settings.max_bytes, timedelta(days=1))
        recorder = CaptureRecorder(settings, store)
        planes = {"off": Plane(model, None), "on": Plane(model, recorder)}
        try:
            for plane in planes.values():  # warm-up (not one of the measured prompts: no cached prefix)
                plane.ask([{"role": "user", "content": "Say hello."}], 4)
            figures: dict[str, list[tuple[float, float]]] = {"off": [], "on": []}
            for index, messages in enumerate(requests):
                # Alternating which goes first cancels any drift of the machine over the run.
                order = ("off", "on") if index % 2 == 0 else ("on", "off")
                for label in order:
                    figures[label].append(planes[label].ask(messages, args.max_tokens))
            recorder.drain()
            write_ms = _write_ms(recorder, store)
        finally:
            for plane in planes.values():
                plane.close()
            store.close()
    ttft = {k: statistics.median(f[0] for f in v) * 1000 for k, v in figures.items()}
    decode = {k: statistics.median(f[1] for f in v) for k, v in figures.items()}
    # Ratios per request (the same prompt, sent back to back), then their median: robust to the machine's
    # load drifting over the run.
    pairs = list(zip(figures["off"], figures["on"], strict=True))
    ttft_ratio = statistics.median(on[0] / off[0] for off, on in pairs)
    decode_ratio = statistics.median(on[1] / off[1] for off, on in pairs if off[1] and on[1])
    table = Table(
        "figure",
        "capture off",
        "capture on",
        "on / off (median of pairs)",
        title=f"{len(requests)} Slips requests each",
    )
    table.add_row("median TTFT (ms)", f"{ttft['off']:.0f}", f"{ttft['on']:.0f}", f"{ttft_ratio:.3f}")
    table.add_row(
        "median decode (tokens/s)", f"{decode['off']:.1f}", f"{decode['on']:.1f}", f"{decode_ratio:.3f}"
    )
    table.add_row("recorder per exchange (ms, its own thread)", "-", f"{write_ms:.2f}", "-")
    console.print(table)
    console.print(f"captured: {recorder.counts.stored} stored, {recorder.counts.dropped} dropped")


def _write_ms(recorder: CaptureRecorder, store: CaptureStore) -> float:
    """The recorder's work for one exchange (validation, redaction, write), timed on what it stored."""
    chunk = store.chunk(0, None, 1 << 30)
    started = time.perf_counter()
    for exchange in chunk.exchanges:
        store.add(recorder.redactor.exchange(exchange))
    return (time.perf_counter() - started) / max(len(chunk.exchanges), 1) * 1000


if __name__ == "__main__":
    main()
