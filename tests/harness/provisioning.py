"""Running the repository's playbooks in tests: ansible-playbook from this venv, the PLAY RECAP parsed,
mosquitto started with the broker role's config, and MQTT clients holding pki-issued certificates."""

from __future__ import annotations

import getpass
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import paho.mqtt.client as mqtt

from tests.harness.broker import mosquitto_binary
from tests.harness.net import wait_for_port

REPO = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = REPO / "ansible"
BIN = Path(sys.executable).parent
ENV = {
    **os.environ,
    "PATH": f"{BIN}:{os.environ['PATH']}",
    "ANSIBLE_NOCOLOR": "1",
    "ANSIBLE_FORCE_COLOR": "0",
}


def run_ansible(*args: str | Path, cwd: Path = ANSIBLE_DIR) -> subprocess.CompletedProcess[str]:
    """An ansible command from this venv (``ansible-playbook``, ``ansible-lint``), output captured."""
    return subprocess.run(
        [str(a) for a in args], cwd=cwd, env=ENV, capture_output=True, text=True, check=False
    )


def recap(output: str) -> dict[str, dict[str, int]]:
    """PLAY RECAP as {host: {"ok": n, "changed": n, ...}}."""
    tail = output[output.index("PLAY RECAP") :]
    return {
        host: {key: int(value) for key, value in re.findall(r"(\w+)=(\d+)", counts)}
        for host, counts in re.findall(r"^(\S+)\s+:\s+(.*)$", tail, re.MULTILINE)
    }


@contextmanager
def role_broker(conf_d: Path, port: int, scratch: Path) -> Iterator[None]:
    """mosquitto started the way Debian's main config does it: including the role's conf.d folder."""
    main = scratch / "mosquitto.conf"
    main.write_text(
        f"user {getpass.getuser()}\nlog_dest file {scratch / 'mosquitto.log'}\ninclude_dir {conf_d}\n"
    )
    process = subprocess.Popen([mosquitto_binary(), "-c", str(main)], stderr=subprocess.PIPE)
    try:
        wait_for_port(port, alive=lambda: process.poll() is None)
        yield
    finally:
        process.terminate()
        process.wait(timeout=10)
        if process.stderr is not None:
            process.stderr.close()


class TlsClient:
    """A client authenticating with a certificate the pki role issued; keeps what it receives and the
    reason code of every PUBACK."""

    def __init__(self, pki: Path, name: str, port: int) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.acks: dict[int, int] = {}
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"{name}-test", protocol=mqtt.MQTTv5
        )
        self.client.tls_set(
            ca_certs=str(pki / "ca.pem"), certfile=str(pki / f"{name}.pem"), keyfile=str(pki / f"{name}.key")
        )
        connected = threading.Event()
        self.client.on_connect = lambda *args: connected.set()
        self.client.on_message = lambda _c, _u, m: self.messages.append((m.topic, m.payload))
        self.client.on_publish = lambda _c, _u, mid, reason, _p: self.acks.__setitem__(mid, reason.value)
        self.client.connect("localhost", port)
        self.client.loop_start()
        assert connected.wait(10), f"{name} could not connect"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
