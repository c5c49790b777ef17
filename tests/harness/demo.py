"""``make demo``: the whole delivery path on one machine, with the real tools.

Generates keys, signs a manifest for the bundled SmolLM2 GGUF, serves it from a loopback artifact
server, publishes it retained on a local mosquitto, and watches ``immune-edge run`` take it to
``committed``; then shows a forged manifest being rejected and an operator status command. Then
Slips' side: an alert summary asked over the Ollama API, and a live swap to Gemma-3 while four
clients keep sending requests, with tokens/sec before and after. With ``--train`` (``make demo TRAIN=1``)
it also fine-tunes a tiny model on CPU from Slips data, exports, evaluates and publishes it with
``immune-train``, and the same daemon takes it. Everything lands in ``demo-out/``.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from shared.signing import load_private_key
from tests.harness.artifact_server import ArtifactServer
from tests.harness.broker import Mosquitto
from tests.harness.edge import DEVICE, FLEET, HOST_ARCH, TOPICS, FleetObserver, sign_command
from tests.harness.load import LoadClients
from tests.harness.models import SMOLLM2_FILE, gemma3_gguf, smollm2_gguf
from tests.harness.net import free_port
from tests.harness.slips_prompts import incident_texts, summary_messages
from tests.harness.training import immune_train, tiny_run, train_tiny, write_publish_config

console = Console()
BIN = Path(sys.executable).parent


def step(title: str) -> None:
    console.rule(f"[bold]{title}")


def tool(*args: str | Path) -> str:
    """Run one of our CLIs as an operator would; stop the demo with its message if it fails."""
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        console.print(result.stdout, result.stderr)
        raise SystemExit(f"demo step failed: {' '.join(map(str, args))}")
    return result.stdout


def expect(condition: bool, failure: str) -> None:
    """Stop the demo, exit status 1, when a step did not do what it shows (tests/test_demo.py runs it)."""
    if not condition:
        raise SystemExit(f"demo step failed: {failure}")


def show_events(observer: FleetObserver, deployment_id: str | None = None) -> None:
    table = Table("state", "serial", "source", "reason")
    for event in observer.unique_events(deployment_id):
        table.add_row(event["state"], str(event.get("serial", "-")), event["source"], event.get("reason", ""))
    console.print(table)


def sign_model_manifest(
    out: Path, model: Path, url: str, name: str, serial: int, chat: str, stop: str
) -> Path:
    """``immune-fleet manifest create`` then ``sign`` with the trainer key; returns the envelope file."""
    manifest = out / f"{name}-{serial}.json"
    tool(
        BIN / "immune-fleet", "manifest", "create", model, "--name", name, "--serial", str(serial),
        "--chat-format", chat, "--stop", stop, "--url", url, "--arch", HOST_ARCH, "-o", manifest,
    )  # fmt: skip
    envelope = manifest.with_suffix(".dsse.json")
    tool(BIN / "immune-fleet", "sign", manifest, "--key", out / "keys" / "trainer-1.key", "-o", envelope)
    return envelope


def ask_summary(api: str, incident: str) -> dict[str, object]:
    """What Slips' LLM module sends (Ollama provider): a non-streaming /api/chat with options."""
    body = {
        "model": "slips",
        "messages": summary_messages(incident),
        "stream": False,
        "options": {"temperature": 0.2, "num_predict": 96},
    }
    return httpx.post(f"{api}/api/chat", json=body, timeout=600).raise_for_status().json()


def tokens_per_second(reply: dict[str, object]) -> float:
    return float(reply["eval_count"]) / (float(reply["eval_duration"]) / 1e9)  # type: ignore[arg-type]


SHARED_SLIPS = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "slips"


def train_and_publish(out: Path, broker: Mosquitto, server: ArtifactServer, observer: FleetObserver) -> None:
    """immune-train end to end on a tiny Llama (CPU), published to the fleet the daemon belongs to."""
    run = tiny_run(out / "training")
    if SHARED_SLIPS.is_dir():
        step("immune-train prepare on the real Slips datasets (token counts from the tiny model's tokenizer)")
        console.print(
            immune_train(
                "prepare", f"slips-summary={SHARED_SLIPS / 'summarization_dataset_v3.json.gz'}",
                f"slips-risk={SHARED_SLIPS / 'risk_dataset.json.gz'}", "--tokenizer", run.base,
                "--max-tokens", "4096", "-o", out / "slips-data",
            ).stdout
        )  # fmt: skip
    # A 2-layer toy learns the short, regular fixture answers in 60 CPU steps; on the real answers
    # it only learns to emit whitespace, which the device's health gate rightly refuses.
    step("immune-train: prepare (Slips-format fixture) -> Unsloth fine-tune on CPU -> GGUF export -> eval")
    train_tiny(run)
    console.print(json.dumps(json.loads((run.data / "stats.json").read_text())["records"]))
    console.print((run.gguf_dir / "eval.json").read_text())

    step("immune-train publish: artifact store, trainer-signed manifest, retained on the fleet topic")
    config = write_publish_config(
        out / "publish.toml", FLEET, [out / "keys" / "trainer-1.key"], out / "keyring.json",
        broker.host, broker.port, server.root, server.base_url,
    )  # fmt: skip
    ends = len(observer.terminal_events())
    published = immune_train(
        "publish", run.gguf_dir, "--config", config, "--name", "slips/tiny-demo:q4_k_m",
        "--quant", "q4_k_m", "--arch", HOST_ARCH, "--run-dir", run.run_dir, "--n-ctx", "1024",
    )  # fmt: skip
    console.print(published.stdout)
    end = observer.wait_terminal(ends + 1, timeout=300)[-1]
    show_events(observer, end["deployment_id"])


def main(out: Path, train: bool = False) -> None:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    model = smollm2_gguf()

    step("keys for each role (private keys are mode 0600) and the trusted keyring")
    for role in ("root", "trainer", "operator"):
        tool(
            BIN / "immune-fleet",
            "keys",
            "generate",
            "--role",
            role,
            "--name",
            f"{role}-1",
            "--dir",
            out / "keys",
        )
    tool(
        BIN / "immune-fleet",
        "keyring",
        "create",
        *sorted((out / "keys").glob("*.pub.json")),
        "-o",
        out / "keyring.json",
    )
    console.print(tool("ls", "-l", out / "keys"))

    with Mosquitto(out / "broker") as broker, ArtifactServer(out / "artifacts") as server:
        url = server.add_file(model)
        step(f"manifest for {model.name}, signed by the trainer key")
        envelope_file = sign_model_manifest(out, model, url, "slips-summary-smol", 1, "chatml", "<|im_end|>")
        console.print(f"artifact server: {url}\nbroker: mqtt://{broker.host}:{broker.port}")

        device = out / "device"
        device.mkdir()
        config = device / "edge.toml"
        port = free_port()  # 11434 in production (where Slips looks); a free one here
        api = f"http://127.0.0.1:{port}"
        config.write_text(
            f'keyring_file = "{out / "keyring.json"}"\n\n[device]\nid = "{DEVICE}"\nfleet = "{FLEET}"\n'
            f'groups = ["canary"]\n\n[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\n\n'
            f'[store]\nstate_dir = "{device / "state"}"\n\n'
            f'[api]\nport = {port}\nsocket = "{device / "api.sock"}"\naliases = ["slips"]\n\n'
            f"[runtime]\ntrial_s = 5.0\n"
        )
        step("device config")
        console.print(config.read_text())

        observer = FleetObserver(broker)
        log_file = (device / "edge.log").open("w")
        daemon = subprocess.Popen([BIN / "immune-edge", "run", "--config", config], stderr=log_file)
        console.print(f"daemon log (its own lines, then llama.cpp's): {device / 'edge.log'}")
        try:
            step("publish the signed manifest as the fleet's retained desired state")
            observer.publish(TOPICS.desired_fleet(), envelope_file.read_bytes())
            (end,) = observer.wait_terminal(timeout=120)
            show_events(observer, end["deployment_id"])
            expect(end["state"] == "committed", f"serial 1 ended {end['state']}, not committed")

            step("a tampered manifest (download URL changed after signing) is rejected")
            envelope = json.loads(envelope_file.read_bytes())
            payload = json.loads(base64.b64decode(envelope["payload"]))
            payload["serial"] = 2
            payload["files"][0]["urls"] = ["http://198.51.100.7/evil.gguf"]
            envelope["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
            observer.publish(TOPICS.desired_device(DEVICE), json.dumps(envelope).encode())
            rejected = observer.wait_terminal(2, timeout=60)[-1]
            show_events(observer, rejected["deployment_id"])
            expect(rejected["state"] == "rejected", f"the tampered manifest ended {rejected['state']}")
            # Device-level desired state outranks the fleet's: clear the rejected one, or later
            # fleet-wide manifests would never apply to this device.
            observer.publish(TOPICS.desired_device(DEVICE), b"")

            step("operator status command (MQTT v5 request/response, operator-signed)")
            operator_key = load_private_key(out / "keys" / "operator-1.key")
            response = observer.command(sign_command([operator_key], {"action": "status"}))
            expect(response["ok"] and response["result"]["serial"] == 1, f"status answered {response}")
            table = Table("key", "value")
            for key, value in response["result"].items():
                table.add_row(key, str(value))
            console.print(table)

            step("Slips asks for an alert summary (Ollama /api/chat, as Slips' LLM module sends it)")
            incident = incident_texts(1, max_words=200)[0]
            console.print(f"[dim]{incident[:600]}...[/]")
            reply = ask_summary(api, incident)
            console.print(f"[bold]{reply['model']}[/]: {reply['message']['content']}")  # type: ignore[index]
            expect(bool(str(reply["message"]["content"]).strip()), "the summary is empty")  # type: ignore[index]
            before = tokens_per_second(reply)
            console.print(
                f"prompt_eval_count {reply['prompt_eval_count']}, eval_count {reply['eval_count']}, "
                f"{before:.1f} tokens/s"
            )

            step("live swap to Gemma-3-270M while 4 clients keep sending requests")
            gemma = gemma3_gguf()
            gemma_envelope = sign_model_manifest(
                out, gemma, server.add_file(gemma), "slips-summary-gemma", 3, "gemma", "<end_of_turn>"
            )
            with LoadClients(api, clients=4, max_tokens=16) as load:
                load.wait_for_requests(4)
                ends = len(observer.terminal_events())
                observer.publish(TOPICS.desired_fleet(), gemma_envelope.read_bytes())
                swapped = observer.wait_terminal(ends + 1, timeout=300)[-1]
                load.wait_for_requests(4)
            show_events(observer, swapped["deployment_id"])
            outcomes = load.snapshot()
            served = sorted({o.model for o in outcomes if o.ok})
            console.print(
                f"{len(outcomes)} requests during the swap, {len(load.failures())} failed; served by {served}"
            )
            expect(swapped["state"] == "committed", f"the swap to Gemma-3 ended {swapped['state']}")
            expect(not load.failures(), f"requests failed during the swap: {load.failures()[:3]}")
            after_reply = ask_summary(api, incident)
            after = tokens_per_second(after_reply)
            console.print(f"[bold]{after_reply['model']}[/]: {after_reply['message']['content']}")  # type: ignore[index]
            speed = Table("model", "tokens/s (alert summary)")
            speed.add_row(str(reply["model"]), f"{before:.1f}")
            speed.add_row(str(after_reply["model"]), f"{after:.1f}")
            console.print(speed)
            step("immune-edge doctor: the checks an operator makes before calling for help")
            console.print(tool(BIN / "immune-edge", "doctor", "--config", config))
            if train:
                train_and_publish(out, broker, server, observer)
                trained = ask_summary(api, incident[:200])  # the toy model has a 1024-token context
                console.print(
                    f"[bold]{trained['model']}[/] (a 2-layer toy, so expect noise): "
                    f"{trained['message']['content']!r}"
                )  # type: ignore[index]
        finally:
            daemon.terminate()
            daemon.wait(timeout=30)
            observer.close()
            log_file.close()

    step(f"what the daemon logged about the input it refused ({device / 'edge.log'})")
    audit = [line for line in (device / "edge.log").read_text().splitlines() if " edge.audit: " in line]
    console.print("\n".join(audit) or "[red]no refusal logged[/]", highlight=False, soft_wrap=True)
    expect(bool(audit), "the daemon logged no refusal of the tampered manifest")

    step("device state after the daemon stopped (immune-edge status)")
    console.print(tool(BIN / "immune-edge", "status", "--config", config))
    stored = device / "state" / "store" / "sha256"
    console.print(f"store: {[p.name[:16] for p in stored.iterdir()]} ({SMOLLM2_FILE})")
    console.print(f"[green]demo finished[/]: files in {out}/, daemon log in {device / 'edge.log'}")


if __name__ == "__main__":
    arguments = [a for a in sys.argv[1:] if a != "--train"]
    main(Path(arguments[0] if arguments else "demo-out").resolve(), train="--train" in sys.argv)
