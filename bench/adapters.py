"""One base plus LoRA adapters against merged models, on the real SmolLM2: bytes to deliver an update,
worker RAM, decode and prompt tokens/s, and request latency while an adapter is replaced.

With a real recipe's run (``make train-adapter``, run folder ``train-adapter-out/run``), the adapter
is that run's LoRA as ``immune-train export --adapter`` wrote it, on the base it is bound to (the
training base requantized to q4_k_m), and the merged model is the run's q4_k_m; without it
(--synthetic, the CI smoke), two random adapters from tests/harness and the base itself stand in,
which measures the mechanics but not the real sizes.

Run: .venv/bin/python -m bench.adapters [--run train-adapter-out/run] [--requests 40] [--synthetic]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
from pathlib import Path

import httpx
import psutil
from rich.console import Console
from rich.table import Table

from edge.assembly import DataPlane, HostPaths
from edge.config import ApiSettings, RuntimeSettings, ThermalSettings
from shared.manifest import Quantization, RuntimeProfile
from tests.harness.load import LoadClients
from tests.harness.lora_fixture import write_lora
from tests.harness.models import smollm2_gguf
from tests.harness.net import free_port
from trainer.export_folder import find_gguf, read_export_report
from trainer.records import ExportedAdapter

console = Console(width=140)
PROFILE = RuntimeProfile(chat_format="chatml", n_ctx=1024)
PROMPT = (
    "Summarise this Slips alert for an analyst: horizontal port scan to port 23/TCP from 192.168.1.113 "
    "to 94 hosts, threat level high, confidence 0.9, followed by 40 connections to 185.12.4.9:4444."
)


class Plane:
    """An in-process data plane on a free port (one worker per served file)."""

    def __init__(self, model: Path, name: str) -> None:
        self.port = free_port()
        api = ApiSettings(host="127.0.0.1", port=self.port, socket=None, max_tokens_cap=512)
        self.plane = DataPlane(api, RuntimeSettings(n_threads=1), ThermalSettings(), None, HostPaths())
        self.plane.start()
        self.plane.runtime.serve_file(model, name, PROFILE)
        self.url = f"http://127.0.0.1:{self.port}"

    def rss_mb(self) -> float:
        return psutil.Process(self.plane.router.active.worker.pid).memory_info().rss / 2**20

    def close(self) -> None:
        self.plane.close()


def _rates(url: str, model: str, rounds: int) -> tuple[float, float]:
    """(decode tokens/s, prompt tokens/s), medians over ``rounds`` fresh prompts."""
    decode, prompt = [], []
    for r in range(rounds):
        body = {
            "model": model,
            "messages": [{"role": "user", "content": f"[{r}] {PROMPT}"}],  # a new prefix each round
            "options": {"temperature": 0, "num_predict": 64},
            "stream": False,
        }
        reply = httpx.post(f"{url}/api/chat", json=body, timeout=300).json()
        decode.append(reply["eval_count"] / max(reply["eval_duration"] / 1e9, 1e-9))
        prompt.append(reply["prompt_eval_count"] / max(reply["prompt_eval_duration"] / 1e9, 1e-9))
    return statistics.median(decode), statistics.median(prompt)


def _p99(seconds: list[float]) -> float:
    ordered = sorted(seconds)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


def _latency(
    plane: Plane, adapters: list[Path], requests: int, swap_every_s: float | None
) -> tuple[list[float], int, int]:
    """Request latencies on adapter "task" from 2 clients (Slips' default), with its version
    replaced every ``swap_every_s`` (0: back to back; None: never); returns (latencies, failures,
    swaps)."""
    runtime = plane.plane.runtime
    stop = threading.Event()
    swaps = 0

    def swap() -> None:
        nonlocal swaps
        while not stop.wait(swap_every_s or 0):
            swaps += 1
            runtime.adapters.serve("task", adapters[swaps % 2], key=f"task-{plane.port}-{swaps}")

    swapper = threading.Thread(target=swap, daemon=True) if swap_every_s is not None else None
    with LoadClients(plane.url, clients=2, model="task", max_tokens=16) as load:
        if swapper is not None:
            swapper.start()
        load.wait_for_requests(requests, timeout=900)
        stop.set()
    if swapper is not None:
        swapper.join(timeout=120)
    outcomes = load.snapshot()
    return [o.seconds for o in outcomes if o.ok], sum(not o.ok for o in outcomes), swaps


def _run_adapter(run: Path) -> ExportedAdapter:
    """The adapter ``export --adapter`` recorded for the run, else exported now for the base
    requantized to q4_k_m (the recipe's choice)."""
    from trainer.layout import RunLayout

    report = read_export_report(RunLayout(run).export.root)
    if report is not None and report.adapter is not None:
        return report.adapter
    from trainer.adapter_export import export_adapter
    from trainer.toolchain import prepare_toolchain

    return export_adapter(run, prepare_toolchain(), Quantization.Q4_K_M)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("train-adapter-out/run"))
    parser.add_argument("--synthetic", action="store_true", help="random adapters, no real run needed")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument(
        "--swap-every", type=float, default=5.0, help="seconds between updates in the one-at-a-time case"
    )
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="bench-adapters-"))
    if args.synthetic:
        base = smollm2_gguf()
        first, second = (write_lora(scratch / f"lora-{s}.gguf", base, s) for s in (1, 2))
        merged, label = base, "synthetic adapters; the base stands in for a merged model"
    else:
        exported = _run_adapter(args.run)
        base, first = Path(exported.base_path), args.run / "gguf" / exported.file
        second = write_lora(scratch / "lora-2.gguf", base, 2)  # a second task's adapter for RAM and swaps
        merged = find_gguf(args.run / "gguf", Quantization.Q4_K_M)  # the file export recorded
        label = f"real adapter of {args.run} on {base.name}"

    shared = Plane(base, "base")
    try:
        shared.plane.runtime.adapters.serve("task", first, key="task-0")
        shared.plane.runtime.adapters.serve("other", second, key="other-0")
        shared_rss = shared.rss_mb()
        adapter_rates = _rates(shared.url, "task", args.rounds)
        base_rates = _rates(shared.url, "base", args.rounds)  # what the base's own type costs
        steady, steady_failed, _ = _latency(shared, [first, second], args.requests, None)
        spaced, spaced_failed, spaced_swaps = _latency(
            shared, [first, second], args.requests, args.swap_every
        )
        swapped, swap_failed, swaps = _latency(shared, [first, second], args.requests, 0)
    finally:
        shared.close()
    merged_planes = [Plane(merged, f"merged-{i}") for i in range(2)]
    try:
        merged_rss = sum(p.rss_mb() for p in merged_planes)
        merged_rates = _rates(merged_planes[0].url, "merged-0", args.rounds)
    finally:
        for plane in merged_planes:
            plane.close()

    table = Table(title=f"one base + adapters vs merged models, SmolLM2-135M, 1 thread ({label})")
    for column in ("measure", "base + adapter", "merged", "ratio", "goal"):
        table.add_column(column, justify="left" if column == "measure" else "right")
    update, whole = first.stat().st_size, merged.stat().st_size
    table.add_row(
        "bytes for an update",
        f"{update / 2**20:.1f} MiB",
        f"{whole / 2**20:.1f} MiB",
        f"{update / whole:.3f}x",
        "<= 0.05x",
    )
    table.add_row(
        "worker RSS, 2 tasks (MiB)",
        f"{shared_rss:.0f}",
        f"{merged_rss:.0f}",
        f"{shared_rss / merged_rss:.3f}x",
        "<= 0.6x",
    )
    for i, what in enumerate(("decode tokens/s", "prompt tokens/s")):
        ours, alone, theirs = adapter_rates[i], base_rates[i], merged_rates[i]
        table.add_row(what, f"{ours:.1f}", f"{theirs:.1f}", f"{ours / theirs:.3f}x", ">= 0.9x")
        alone_ratio = f"{alone / theirs:.3f}x"
        table.add_row(f"  {what}, the base alone", f"{alone:.1f}", f"{theirs:.1f}", alone_ratio, "-")
    for what, latencies in (
        (f"p99 latency, an update every {args.swap_every:g} s vs steady (s)", spaced),
        ("p99 latency, updates back to back vs steady (s)", swapped),
    ):
        table.add_row(
            what,
            f"{_p99(latencies):.3f}",
            f"{_p99(steady):.3f}",
            f"{_p99(latencies) / _p99(steady):.3f}x",
            "<= 1.5x",
        )
    console.print(table)
    counts = (
        f"{len(steady)} steady ({steady_failed} failed), {len(spaced)} with {spaced_swaps} spaced updates "
        f"({spaced_failed} failed), {len(swapped)} with {swaps} back-to-back updates ({swap_failed} failed)"
    )
    console.print(f"requests: {counts}")


if __name__ == "__main__":
    main()
