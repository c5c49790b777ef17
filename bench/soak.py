"""Soak: `immune-edge run` for a long stretch under steady Slips traffic, with a signed swap every few
minutes and telemetry at 1 Hz, watching for what only time shows: failed requests, memory that
creeps, file descriptors or threads that leak, an outbox that does not drain.

    python -m bench.soak --minutes 30 --swap-every 300     # the figures in docs/benchmarks.md
    python -m bench.soak --minutes 1 --swap-every 20       # the CI smoke

Real parts: the daemon (its own process, as systemd runs it), mosquitto, the artifact server, the
SmolLM2 and Gemma-3 GGUFs it swaps between (serials counting up), and 4 clients sending a Slips
incident summary request one after another. Memory is compared with its level after a warm-up (the
first two swaps): the control plane's RSS as it is; each model's worker at the end of its life
against the first worker of that model after warm-up at the same point (a swap starts a new
worker, which grows for its first minutes), split into anonymous memory (a leak) and the mapped
model file."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from rich.console import Console
from rich.table import Table

from shared.signing import generate_key
from tests.conftest import FleetKeys
from tests.harness.artifact_server import ArtifactServer
from tests.harness.broker import Mosquitto
from tests.harness.edge import TOPICS, FleetObserver, ServingOptions, sign_manifest, write_edge_config
from tests.harness.load import ALERT_PROMPT, LoadClients
from tests.harness.models import gemma3_gguf, smollm2_gguf

console = Console(width=160)
RUNTIMES = {
    "smollm2": {"chat_format": "chatml", "n_ctx": 2048, "stop": ["<|im_end|>"]},
    "gemma": {"chat_format": "gemma", "n_ctx": 2048, "stop": ["<end_of_turn>"]},
}


@dataclass
class Sample:
    at_s: float
    model: str
    daemon_rss_mb: float
    worker_rss_mb: float
    #: the worker's anonymous memory (heap, KV cache) and file-backed pages (the mmapped GGUF)
    worker_anon_mb: float
    worker_file_mb: float
    worker_pid: int
    fds: int
    threads: int


@dataclass
class Soak:
    samples: list[Sample] = field(default_factory=list)
    swaps: list[str] = field(default_factory=list)
    requests: int = 0
    failed: int = 0
    #: status and error of each failed request
    failures: list[str] = field(default_factory=list)
    unsent_at_end: int = -1


def _slips_prompt() -> str:
    """A real Slips incident (about 300 words) when the datasets are beside the repository."""
    try:
        from tests.harness.slips_prompts import incident_texts

        return "Summarise this Slips incident for an analyst:\n" + incident_texts(1, max_words=300)[0]
    except SystemExit:
        return ALERT_PROMPT


def _rss_parts_mb(pid: int) -> tuple[float, float]:
    """RssAnon and RssFile from /proc: a leak grows the first; pages of the mmapped model, the second."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    kib = {key: int(value.split()[0]) for key, _, value in (line.partition(":") for line in lines)
           if key in ("RssAnon", "RssFile")}  # fmt: skip
    return round(kib["RssAnon"] / 1024, 1), round(kib["RssFile"] / 1024, 1)


def _sample(daemon: psutil.Process, started: float, model: str) -> Sample:
    workers = [p for p in daemon.children(recursive=True) if "spawn_main" in " ".join(p.cmdline())]
    parts = [_rss_parts_mb(w.pid) for w in workers]
    return Sample(
        round(time.monotonic() - started, 1),
        model,
        round(daemon.memory_info().rss / 2**20, 1),
        round(sum(w.memory_info().rss for w in workers) / 2**20, 1),
        round(sum(anon for anon, _ in parts), 1),
        round(sum(file for _, file in parts), 1),
        workers[0].pid if len(workers) == 1 else 0,
        daemon.num_fds(),
        daemon.num_threads(),
    )


def soak(minutes: float, swap_every_s: float, root: Path) -> Soak:
    result = Soak()
    keys = FleetKeys(*(generate_key() for _ in range(6)))
    models = {"smollm2": smollm2_gguf(), "gemma": gemma3_gguf()}
    serving = ServingOptions(trial_s=5.0, n_threads=2)
    with Mosquitto(root / "broker") as broker, ArtifactServer(root / "artifacts") as server:
        config = write_edge_config(
            root / "device", broker, keys.keyring(), serving=serving,
            extra="[telemetry]\ninterval_s = 1\nstatus_every_s = 10\n",
        )  # fmt: skip
        urls = {name: server.add_file(path) for name, path in models.items()}
        observer = FleetObserver(broker)
        log = (root / "edge.log").open("w")
        process = subprocess.Popen(
            [sys.executable, "-m", "edge.cli", "run", "--config", str(config)], stderr=log
        )
        daemon = psutil.Process(process.pid)
        serial, current = 1, "smollm2"

        def deploy(name: str) -> None:
            nonlocal serial, current
            envelope = sign_manifest(
                [keys.trainer], models[name].read_bytes(), urls[name], serial=serial,
                name=f"slips-{name}", runtime=RUNTIMES[name],
            )  # fmt: skip
            ends = len(observer.terminal_events())
            observer.publish(TOPICS.desired_fleet(), envelope)
            end = observer.wait_terminal(ends + 1, timeout=600)[-1]
            result.swaps.append(f"{name} #{serial}: {end['state']}")
            if end["state"] != "committed":
                raise SystemExit(f"swap to {name} #{serial} ended {end['state']}: {end.get('reason')}")
            serial, current = serial + 1, name

        try:
            deploy("smollm2")
            started = time.monotonic()
            next_swap = started + swap_every_s
            with LoadClients(serving.base_url, clients=4, max_tokens=48, prompt=_slips_prompt()) as load:
                while time.monotonic() - started < minutes * 60:
                    result.samples.append(_sample(daemon, started, current))
                    if time.monotonic() >= next_swap:
                        deploy("gemma" if current == "smollm2" else "smollm2")
                        next_swap = time.monotonic() + swap_every_s
                    time.sleep(5)
            outcomes = load.snapshot()
            result.requests, result.failed = len(outcomes), len(load.failures())
            failures = load.failures()
            result.failures = [
                f"{o.status} at {o.ended - o.seconds - started:.0f} s into the run, after {o.seconds:.0f} s: "
                f"{o.error[:200]}"
                for o in failures
            ]
            time.sleep(3)  # the last telemetry and status go out
            status = subprocess.run(
                [sys.executable, "-m", "edge.cli", "status", "--config", str(config)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            unsent = next(line for line in status.stdout.splitlines() if "unsent messages" in line)
            result.unsent_at_end = int(unsent.split("unsent messages:")[1].split(";")[0])
        finally:
            observer.close()
            process.terminate()
            process.wait(timeout=60)
    return result


def _end_of_life(samples: list[Sample], pid: int) -> Sample:
    """One worker's level at the end of its life: the median of its last three samples, per figure."""
    last = [s for s in samples if s.worker_pid == pid][-3:]
    return Sample(
        last[-1].at_s, last[-1].model, statistics.median(s.daemon_rss_mb for s in last),
        statistics.median(s.worker_rss_mb for s in last), statistics.median(s.worker_anon_mb for s in last),
        statistics.median(s.worker_file_mb for s in last), pid, last[-1].fds, last[-1].threads,
    )  # fmt: skip


def report(result: Soak, warm_up_swaps: int) -> dict[str, object]:
    """Figures after warm-up: drift of each memory figure, range of fds and threads.

    Each swap starts a new worker, and a fresh worker grows for its first minutes (it pages in its
    model and allocates its buffers), so a worker is compared with the first worker of the same
    model after warm-up at the same point of its life: the end of it."""
    pairs = zip(result.samples, result.samples[1:], strict=False)
    swap_times = [s.at_s for a, s in pairs if a.model != s.model]
    warm = swap_times[warm_up_swaps - 1] if len(swap_times) >= warm_up_swaps else 0.0
    after = [s for s in result.samples if s.at_s > warm + 10] or result.samples
    daemon = [s.daemon_rss_mb for s in after]
    drift: dict[str, object] = {
        "daemon": round(statistics.median(daemon[-6:]) / statistics.median(daemon[:6]), 3)
    }
    for model in sorted({s.model for s in after}):
        pids = list(dict.fromkeys(s.worker_pid for s in after if s.model == model and s.worker_pid))
        if len(pids) >= 2:
            first, last = _end_of_life(after, pids[0]), _end_of_life(after, pids[-1])
            drift[f"worker {model} ({len(pids)} workers)"] = {
                "rss": round(last.worker_rss_mb / first.worker_rss_mb, 3),
                "anon": round(last.worker_anon_mb / first.worker_anon_mb, 3),
                "file": round(last.worker_file_mb / first.worker_file_mb, 3),
                "mb_first_last": [first.worker_rss_mb, last.worker_rss_mb],
            }
    return {
        "requests": result.requests,
        "failed": result.failed,
        "failures": result.failures,
        "swaps": result.swaps,
        "warm_up_ends_s": warm,
        "rss_end_vs_warm": drift,
        "fds_after_warm_up": [min(s.fds for s in after), max(s.fds for s in after)],
        "threads_after_warm_up": [min(s.threads for s in after), max(s.threads for s in after)],
        "unsent_outbox_at_end": result.unsent_at_end,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--swap-every", type=float, default=300, help="seconds between signed swaps")
    parser.add_argument("--warm-up-swaps", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--report-only", action="store_true", help="exit 0 even with failed requests (the CI smoke)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        result = soak(args.minutes, args.swap_every, Path(tmp))
    figures = report(result, args.warm_up_swaps)
    table = Table("figure", "value", title=f"soak: {args.minutes:g} min, a swap every {args.swap_every:g} s")
    for key, value in figures.items():
        table.add_row(key, str(value))
    console.print(table)
    if args.json:
        args.json.write_text(
            json.dumps({**figures, "samples": [s.__dict__ for s in result.samples]}, indent=2)
        )
    if (result.failed and not args.report_only) or result.unsent_at_end:
        raise SystemExit(f"{result.failed} failed request(s), {result.unsent_at_end} unsent message(s)")


if __name__ == "__main__":
    main()
