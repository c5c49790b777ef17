"""``make demo``: the whole delivery path on one machine, with the real tools.

Generates keys, signs a manifest for the bundled SmolLM2 GGUF, serves it from a loopback artifact
server, publishes it retained on a local mosquitto, and watches ``immune-edge run`` take it to
``committed``; then shows a forged manifest being rejected and an operator status command.
Everything lands in ``demo-out/``.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from shared.signing import load_private_key
from tests.harness.artifact_server import ArtifactServer
from tests.harness.broker import Mosquitto
from tests.harness.edge import DEVICE, FLEET, HOST_ARCH, TOPICS, FleetObserver, sign_command
from tests.harness.models import SMOLLM2_FILE, smollm2_gguf

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


def show_events(observer: FleetObserver, deployment_id: str | None = None) -> None:
    table = Table("state", "serial", "source", "reason")
    for event in observer.unique_events(deployment_id):
        table.add_row(event["state"], str(event.get("serial", "-")), event["source"], event.get("reason", ""))
    console.print(table)


def main(out: Path) -> None:
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
        tool(
            BIN / "immune-fleet",
            "manifest",
            "create",
            model,
            "--name",
            "slips-summary-smol",
            "--serial",
            "1",
            "--chat-format",
            "chatml",
            "--stop",
            "<|im_end|>",
            "--url",
            url,
            "--arch",
            HOST_ARCH,
            "-o",
            out / "manifest.json",
        )
        tool(
            BIN / "immune-fleet",
            "sign",
            out / "manifest.json",
            "--key",
            out / "keys" / "trainer-1.key",
            "-o",
            out / "manifest.dsse.json",
        )
        console.print(f"artifact server: {url}\nbroker: mqtt://{broker.host}:{broker.port}")

        device = out / "device"
        device.mkdir()
        config = device / "edge.toml"
        config.write_text(
            f'keyring_file = "{out / "keyring.json"}"\n\n[device]\nid = "{DEVICE}"\nfleet = "{FLEET}"\n'
            f'groups = ["canary"]\n\n[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\n\n'
            f'[store]\nstate_dir = "{device / "state"}"\n'
        )
        step("device config")
        console.print(config.read_text())

        observer = FleetObserver(broker)
        log_file = (device / "edge.log").open("w")
        daemon = subprocess.Popen([BIN / "immune-edge", "run", "--config", config], stderr=log_file)
        try:
            step("publish the signed manifest as the fleet's retained desired state")
            observer.publish(TOPICS.desired_fleet(), (out / "manifest.dsse.json").read_bytes())
            (end,) = observer.wait_terminal(timeout=120)
            show_events(observer, end["deployment_id"])

            step("a tampered manifest (download URL changed after signing) is rejected")
            envelope = json.loads((out / "manifest.dsse.json").read_bytes())
            payload = json.loads(base64.b64decode(envelope["payload"]))
            payload["serial"] = 2
            payload["files"][0]["urls"] = ["http://198.51.100.7/evil.gguf"]
            envelope["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
            observer.publish(TOPICS.desired_device(DEVICE), json.dumps(envelope).encode())
            rejected = observer.wait_terminal(2, timeout=60)[-1]
            show_events(observer, rejected["deployment_id"])

            step("operator status command (MQTT v5 request/response, operator-signed)")
            operator_key = load_private_key(out / "keys" / "operator-1.key")
            response = observer.command(sign_command([operator_key], {"action": "status"}))
            table = Table("key", "value")
            for key, value in response["result"].items():
                table.add_row(key, str(value))
            console.print(table)
        finally:
            daemon.terminate()
            daemon.wait(timeout=30)
            observer.close()
            log_file.close()

    step("device state after the daemon stopped (immune-edge status)")
    console.print(tool(BIN / "immune-edge", "status", "--config", config))
    stored = device / "state" / "store" / "sha256"
    console.print(f"store: {[p.name[:16] for p in stored.iterdir()]} ({SMOLLM2_FILE})")
    console.print(f"[green]demo finished[/]: files in {out}/, daemon log in {device / 'edge.log'}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "demo-out").resolve())
