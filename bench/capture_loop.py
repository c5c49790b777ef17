"""The learning loop end to end, every step the real thing: a device (`immune-edge run`) serving SmolLM2
with ``[capture]`` on (IPv4 and MAC addresses redacted) -> a Slips-style client sending alert-summary-v2
requests for real incidents over Ollama's API, as Slips' ollama provider does -> `immune-fleet capture
pull` over the signed command channel -> `immune-train prepare --from-capture` -> `immune-train distill`
by a local teacher over the OpenAI API -> a few `finetune` steps -> `export`
-> `eval` -> `publish` to the same device, which commits the new model -> the client's next request.

The client renders Slips' format with its budgets scaled down (``--budget``, default 1,200 estimated
tokens for the final request and 900 for a reduction, against Slips' 3,200 and 2,400): the real
incidents then need reduction layers, so both request kinds are captured, and every prompt fits a small
model's context.

The teacher: by default bench/replay_teacher.py, which answers each request the way the dataset's GPT-4o
teachers analysed that incident, composed to the output rules (no GPT-4o is reachable from here, and a
135M model as teacher passes none of the contract: `--teacher FILE.gguf` serves one to see that).

Run: .venv/bin/python -m bench.capture_loop [--incidents 10] [--teacher FILE.gguf] [--steps 4]
Results: OUT/results.json (default capture-loop-out/).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from bench.replay_teacher import replay_teacher
from shared.signing import generate_key, write_private_key
from shared.signing.keyring import Keyring, Role, Thresholds, TrustedKey
from tests.harness.artifact_server import ArtifactServer
from tests.harness.broker import Mosquitto
from tests.harness.edge import (
    FLEET,
    HOST_ARCH,
    TOPICS,
    FleetObserver,
    ServingOptions,
    running_daemon,
    sign_manifest,
    write_edge_config,
)
from tests.harness.models import smollm2_gguf
from tests.harness.serve import serving
from tests.harness.slips_prompts import DATASET
from tests.harness.training import immune_train, write_publish_config
from trainer.dataset.profiled import facts_of
from trainer.dataset.slips import SlipsIncident, load_slips_file
from trainer.prompts.alert_summary import AlertSummaryProfile
from trainer.prompts.profile import ClientRequest, IncidentFacts

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = {"chat_format": "chatml", "n_ctx": 4096, "stop": ["<|im_end|>"]}
TRAIN_TOML = """
base_model = "{base}"
train_file = "{train}"
output_dir = "{run}"
max_seq_length = 2048
seed = 3407

[lora]
r = 16
alpha = 32

[training]
max_steps = {steps}
learning_rate = 2e-4
warmup_ratio = 0.0
batch_size = 1
gradient_accumulation = 2
logging_steps = 1
save_steps = 100
gradient_checkpointing = false
"""


def incidents(count: int) -> list[IncidentFacts]:
    """The first ``count`` real incidents with evidence lines."""
    found = []
    for raw in load_slips_file(DATASET):
        try:
            facts = facts_of(SlipsIncident.model_validate(raw))
        except ValueError:
            continue
        found.append(facts)
        if len(found) == count:
            break
    return found


class SlipsClient:
    """Sends what Slips' alert summary sends for an incident (reductions, then the final) over Ollama's
    API, each reduction's answer becoming the next layer's digest item."""

    def __init__(self, base_url: str, profile: AlertSummaryProfile) -> None:
        self.base_url = base_url
        self.profile = profile
        self.sent: list[dict[str, Any]] = []

    def ask(self, request: ClientRequest) -> str:
        body = {
            "model": "slips",
            "messages": request.messages,
            "stream": False,
            "options": {"temperature": request.temperature, "num_predict": request.max_tokens},
        }
        started = time.monotonic()
        reply = httpx.post(f"{self.base_url}/api/chat", json=body, timeout=900)
        answer = reply.json().get("message", {}).get("content", "") if reply.status_code == 200 else ""
        seconds = round(time.monotonic() - started, 1)
        self.sent.append(
            {"kind": request.kind, "status": reply.status_code, "seconds": seconds, "answer": answer}
        )
        return answer or "no answer"

    def summarise(self, incident: IncidentFacts) -> None:
        final = self.profile.requests(incident, lambda request, facts: self.ask(request))[-1]
        self.ask(final)


@contextmanager
def _teacher(which: str, out: Path) -> Iterator[tuple[str, str]]:
    """(URL, model name) of the teacher for the block."""
    if which == "replay":
        with replay_teacher(smollm2_gguf()) as url:
            yield url, "gpt-4o-replay"
        return
    gguf = Path(which)
    with serving(gguf, out / "teacher.sock", "--n-ctx", "4096", "--threads", "2") as server:
        yield server.base, gguf.stem


def step(results: dict[str, Any], name: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """One CLI step, timed; its output goes to the results."""
    started = time.monotonic()
    command = list(args)
    if command[0] == "immune-train":
        done = immune_train(*command[1:])
    else:
        done = subprocess.run(
            [sys.executable, "-m", "fleet.cli", *map(str, command[1:])],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise SystemExit(f"{name} failed:\n{done.stdout}\n{done.stderr}")
    results["steps"].append({"step": name, "wall_s": round(time.monotonic() - started, 1)})
    return done


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ROOT / "capture-loop-out")
    parser.add_argument("--incidents", type=int, default=10)
    parser.add_argument("--budget", type=int, default=1200, help="the client's final-request budget")
    parser.add_argument(
        "--teacher",
        default="replay",
        help="'replay' (bench/replay_teacher.py) or a GGUF to serve as the teacher",
    )
    parser.add_argument("--steps", type=int, default=4, help="finetune steps (0: stop after distill)")
    args = parser.parse_args()
    out: Path = args.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    base = smollm2_gguf()
    results: dict[str, Any] = {"steps": [], "options": {k: str(v) for k, v in vars(args).items()}}

    keys = {role: generate_key() for role in (Role.ROOT, Role.TRAINER, Role.OPERATOR)}
    keyring = Keyring(
        version=1,
        keys=[
            TrustedKey(keyid=k.keyid, role=r, public_key=k.public_b64, name=r.value) for r, k in keys.items()
        ],
        thresholds=Thresholds(),
    )
    (out / "keyring.json").write_bytes(keyring.to_json())
    for role in (Role.TRAINER, Role.OPERATOR):
        write_private_key(keys[role], out / f"{role.value}.key")
    with Mosquitto(out / "broker") as broker, ArtifactServer(out / "artifacts") as server:
        operator = out / "fleet.toml"
        operator.write_text(
            f'fleet = "{FLEET}"\noperator = "op-1"\noperator_keys = ["{out / "operator.key"}"]\n'
            f'data_dir = "{out / "operator"}"\n\n[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\n'
        )
        device_api = ServingOptions(trial_s=5.0, request_timeout_s=900.0, n_threads=2)
        capture = '[capture]\nenabled = true\nmodels = ["slips"]\nredact = ["ipv4", "mac"]\n'
        device = write_edge_config(out / "device", broker, keyring, serving=device_api, extra=capture)
        observer = FleetObserver(broker)
        with running_daemon(device) as daemon:
            url = server.add_file(base)
            first = sign_manifest([keys[Role.TRAINER]], base.read_bytes(), url, runtime=RUNTIME, serial=1)
            observer.publish(TOPICS.desired_fleet(), first)
            observer.wait_terminal(1, timeout=300)

            # 1. Slips asks; the device captures.
            started = time.monotonic()
            client = SlipsClient(device_api.base_url, AlertSummaryProfile(args.budget, args.budget * 3 // 4))
            for incident in incidents(args.incidents):
                client.summarise(incident)
            results["steps"].append({"step": "slips client", "wall_s": round(time.monotonic() - started, 1)})
            results["client"] = list(client.sent)
            recorder = daemon.data.capture  # type: ignore[union-attr]
            recorder.drain()  # type: ignore[union-attr]
            results["captured_on_device"] = dict(recorder.counts.__dict__)  # type: ignore[union-attr]

            # 2. The operator pulls; 3. the trainer prepares and distills; 4. trains, exports, evaluates.
            archive = out / "archive.db"
            pulled = step(results, "capture pull", "immune-fleet", "capture", "pull", "--device", "pi-1",
                          "--archive", archive, "--json", "--config", operator)  # fmt: skip
            results["pull"] = json.loads(pulled.stdout)
            data, distilled, run = out / "data", out / "distilled", out / "run"
            step(results, "prepare", "immune-train", "prepare", "--from-capture", archive, "--prompt-profile",
                 "alert-summary-v2", "--tokenizer", base, "--output", data, "--eval-fraction", "0.2",
                 "--max-tokens", "2048")  # fmt: skip
            results["prepare"] = json.loads((data / "stats.json").read_text())["records"]
            with _teacher(args.teacher, out) as (teacher_url, teacher_model):
                report = step(results, "distill", "immune-train", "distill", data, "--output", distilled,
                              "--teacher", teacher_url, "--teacher-model", teacher_model,
                              "--concurrency", "1")  # fmt: skip
            results["distill"] = report.stdout[-3000:]
            written = sum(1 for line in (distilled / "train.jsonl").read_text().splitlines() if line.strip())
            results["distilled_train_records"] = written
            if written == 0:
                raise SystemExit(f"the teacher's answers all failed the contract:\n{report.stdout}")
            if args.steps > 0:  # 0: the smoke, up to distill (training is tested on its own)
                config = out / "train.toml"
                config.write_text(
                    TRAIN_TOML.format(base=base, train=distilled / "train.jsonl", run=run, steps=args.steps)
                )
                step(results, "finetune", "immune-train", "finetune", "--config", config)
                step(results, "export", "immune-train", "export", run, "--quant", "q4_k_m")
                held_out = distilled / "eval.jsonl"
                if not held_out.read_text().strip():
                    held_out = distilled / "train.jsonl"  # too few answers passed to hold any out
                step(results, "eval", "immune-train", "eval", run / "gguf", "--data", held_out, "--quant",
                     "q4_k_m", "--ppl-records", "4", "--task-records", "4", "--threads", "2",
                     "--baseline-captured")  # fmt: skip
                results["eval"] = json.loads((run / "gguf" / "eval.json").read_text())

                # 5. Published to the device that captured; the client asks again.
                publish = write_publish_config(
                    out / "publish.toml", FLEET, [out / "trainer.key"], out / "keyring.json", broker.host,
                    broker.port, server.root, server.base_url,
                )  # fmt: skip
                ends = len(observer.terminal_events())
                step(results, "publish", "immune-train", "publish", run / "gguf", "--config", publish,
                     "--name", "slips/smollm2-135m-capture:q4_k_m", "--quant", "q4_k_m", "--arch", HOST_ARCH,
                     "--run-dir", run, "--base-model", "SmolLM2-135M-Instruct")  # fmt: skip
                results["deployment"] = observer.wait_terminal(ends + 1, timeout=600)[-1]
                client.sent.clear()
                client.summarise(incidents(args.incidents + 1)[-1])
                results["after_publish"] = client.sent
                results["served"] = daemon.data.router.active.name  # type: ignore[union-attr]
        observer.close()
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "distill"}, indent=2, default=str))
    print(results["distill"])


if __name__ == "__main__":
    main()
