"""Request latency during hot swaps against steady state, and the daemon's own (control-plane) RSS.

A real `immune-edge run` (subprocess) on a real mosquitto and artifact server serves 4 clients
sending Slips-sized chat requests continuously. Steady state is measured on each of the two models
(SmolLM2 and Gemma-3, equal time), then the fleet's desired state flips between them ``--swaps``
times while the clients keep going. Reported: p50/p99 of both phases, their ratio, and failures.

Run: .venv/bin/python -m bench.swap_latency [--swaps 20] [--steady-s 30] [--swap-mode auto]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from rich.console import Console
from rich.table import Table

from shared.signing import generate_key
from tests.conftest import FleetKeys
from tests.harness.artifact_server import ArtifactServer
from tests.harness.broker import Mosquitto
from tests.harness.edge import TOPICS, FleetObserver, ServingOptions, sign_manifest, write_edge_config
from tests.harness.load import LoadClients, Outcome, percentile
from tests.harness.models import gemma3_gguf, smollm2_gguf

console = Console()
MODELS = {
    "smol": (smollm2_gguf, {"chat_format": "chatml", "n_ctx": 2048, "stop": ["<|im_end|>"]}),
    "gemma": (gemma3_gguf, {"chat_format": "gemma", "n_ctx": 2048, "stop": ["<end_of_turn>"]}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--swaps", type=int, default=20)
    parser.add_argument("--steady-s", type=float, default=30.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--swap-mode", choices=["auto", "parallel", "sequential"], default="auto")
    args = parser.parse_args()
    keys = FleetKeys(*(generate_key() for _ in range(6)))
    with (
        tempfile.TemporaryDirectory() as tmp,
        Mosquitto(Path(tmp) / "broker") as broker,
        ArtifactServer(Path(tmp) / "srv") as server,
    ):
        options = ServingOptions(trial_s=2.0, swap=args.swap_mode)
        config = write_edge_config(Path(tmp) / "device", broker, keys.keyring(), serving=options)
        observer = FleetObserver(broker)
        urls = {name: server.add_file(path()) for name, (path, _) in MODELS.items()}
        serial = 0

        def deploy(name: str) -> dict[str, object]:
            nonlocal serial
            serial += 1
            path, runtime = MODELS[name]
            envelope = sign_manifest(
                [keys.trainer],
                path().read_bytes(),
                urls[name],
                serial=serial,
                name=f"slips-{name}",
                runtime=runtime,
            )
            ends = len(observer.terminal_events())
            observer.publish(TOPICS.desired_fleet(), envelope)
            end = observer.wait_terminal(ends + 1, timeout=300)[-1]
            if end["state"] != "committed":
                raise SystemExit(f"deployment of {name} ended {end['state']}: {end.get('reason')}")
            return end

        daemon = subprocess.Popen(
            [Path(sys.executable).parent / "immune-edge", "run", "--config", config],
            stderr=subprocess.DEVNULL,
        )
        try:
            deploy("smol")
            with LoadClients(options.base_url, clients=args.clients, max_tokens=16) as load:
                steady: list[Outcome] = []
                for name in ("smol", "gemma"):
                    if name != "smol":
                        deploy(name)
                    mark = len(load.snapshot())
                    time.sleep(args.steady_s / 2)
                    steady += load.snapshot()[mark:]
                mark = len(load.snapshot())
                started = time.monotonic()
                for i in range(args.swaps):
                    deploy("smol" if i % 2 == 0 else "gemma")
                swapping = load.snapshot()[mark:]
                swap_s = (time.monotonic() - started) / args.swaps
            control_rss = psutil.Process(daemon.pid).memory_info().rss / 2**20
            worker_rss = [c.memory_info().rss / 2**20 for c in psutil.Process(daemon.pid).children()]
        finally:
            daemon.terminate()
            daemon.wait(timeout=60)
            observer.close()
    report(steady, swapping, args, swap_s, control_rss, worker_rss)


def report(
    steady: list[Outcome],
    swapping: list[Outcome],
    args: argparse.Namespace,
    swap_s: float,
    control: float,
    workers: list[float],
) -> None:
    table = Table(title=f"{args.clients} clients, {args.swaps} swaps ({args.swap_mode}), latency per request")
    for column in ("phase", "requests", "failed", "p50 (s)", "p99 (s)"):
        table.add_column(column, justify="right")
    rows = {}
    for phase, outcomes in (("steady state", steady), ("during swaps", swapping)):
        seconds = [o.seconds for o in outcomes if o.ok]
        rows[phase] = (percentile(seconds, 50), percentile(seconds, 99))
        failed = sum(not o.ok for o in outcomes)
        table.add_row(
            phase, str(len(outcomes)), str(failed), f"{rows[phase][0]:.3f}", f"{rows[phase][1]:.3f}"
        )
    console.print(table)
    p50 = rows["during swaps"][0] / rows["steady state"][0]
    p99 = rows["during swaps"][1] / rows["steady state"][1]
    console.print(f"during swaps / steady: p50 {p50:.2f}x, p99 {p99:.2f}x (target p99 <= 1.5x)")
    console.print(f"mean time per swap (publish to committed, incl. {2.0:.0f} s trial): {swap_s:.1f} s")
    console.print(
        f"control-plane RSS (immune-edge run, without workers): {control:.0f} MiB; "
        f"worker RSS: {', '.join(f'{w:.0f}' for w in workers)} MiB"
    )


if __name__ == "__main__":
    main()
