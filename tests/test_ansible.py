"""Provisioning: ansible-lint (production profile) and syntax checks, and a real converge of the pki,
broker, artifact store and edge roles against localhost into throw-away roots, twice (the second run
changes nothing); rotate-keyring.yml run against the role's broker and a running device.
Then the broker config the role wrote runs in a real mosquitto, a daemon configured by the edge role
connects with its pki-issued certificate and takes a manifest, and another device's certificate
cannot publish on the first device's topics."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edge.config import EdgeConfig
from shared.config import load_config
from shared.signing import KEYRING_PAYLOAD_TYPE, Keyring, sign_envelope
from tests.factories import gguf_bytes
from tests.harness.artifact_server import ArtifactServer
from tests.harness.edge import TOPICS, run_doctor, running_daemon, sign_manifest
from tests.harness.net import free_port
from tests.harness.provisioning import BIN, REPO, TlsClient, recap, role_broker, run_ansible
from tests.harness.waiting import wait_until

pytestmark = pytest.mark.timeout(900)


def test_ansible_lint_production_profile() -> None:
    result = run_ansible(BIN / "ansible-lint", "--profile", "production", "--offline", "--nocolor")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.parametrize("playbook", ["site.yml", "rotate-keyring.yml"])
def test_playbooks_pass_syntax_check(playbook: str) -> None:
    result = run_ansible(
        BIN / "ansible-playbook", "--syntax-check", playbook, "-e", "keyring_update=u", "-e", "keyring_new=k"
    )
    assert result.returncode == 0, result.stdout + result.stderr


@dataclass(frozen=True)
class Converged:
    root: Path
    broker_port: int
    runs: list[str]

    def device_root(self, device: str) -> Path:
        return self.root / f"root-{device}"

    @property
    def pki(self) -> Path:
        return self.root / "pki"


def _inventory(root: Path, wheel: Path, keyring: Path, port: int) -> str:
    shared = {
        "ansible_connection": "local",
        "ansible_python_interpreter": sys.executable,
        "immune_manage_system": False,
        "immune_fleet": "lab",
        "immune_fleet_bin": str(BIN / "immune-fleet"),
        "pki_dir": str(root / "pki"),
        "fleet_operators": ["op-1"],
        "fleet_trainers": ["trainer-1"],
        # The fallback install (no wheelhouse): this machine is no Pi; tests/test_arm64.py converges one.
        "edge_wheelhouse": "",
        "edge_wheel": str(wheel),
        "edge_keyring_file": str(keyring),
        "edge_pip_no_deps": True,
        "edge_pip_extras": "",
        "edge_runtime_enabled": False,
        "edge_mqtt_host": "localhost",
        "edge_mqtt_port": port,
        "broker_port": port,
        "broker_bind_address": "127.0.0.1",
    }
    inventory = {
        "all": {
            "vars": shared,
            "children": {
                "pi_fleet": {
                    "hosts": {
                        "pi-1": {"immune_root": str(root / "root-pi-1"), "edge_groups": ["canary"]},
                        "pi-2": {"immune_root": str(root / "root-pi-2"), "edge_groups": ["lab"]},
                    }
                },
                "brokers": {
                    "hosts": {
                        "broker-1": {
                            "immune_root": str(root / "root-broker"),
                            "server_alt_names": ["DNS:localhost", "IP:127.0.0.1"],
                            # What rotate-keyring.yml connects to: the certificate's name, not broker-1.
                            "broker_host": "localhost",
                        }
                    }
                },
                "artifact_stores": {
                    "hosts": {
                        "store-1": {
                            "immune_root": str(root / "root-store"),
                            "server_alt_names": ["DNS:localhost", "IP:127.0.0.1"],
                            "artifact_store_port": 8443,
                        }
                    }
                },
            },
        }
    }
    return json.dumps(inventory)


@pytest.fixture(scope="module")
def converged(tmp_path_factory: pytest.TempPathFactory, fleet_keys) -> Converged:
    root = tmp_path_factory.mktemp("converge")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(root / "dist"), str(REPO)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    (wheel,) = (root / "dist").glob("immune_edge-*.whl")
    keyring = root / "keyring.json"
    keyring.write_bytes(fleet_keys.keyring().to_json())
    port = free_port()
    inventory = root / "inventory.json"
    inventory.write_text(_inventory(root, wheel, keyring, port))
    runs = []
    for _ in range(2):
        result = run_ansible(BIN / "ansible-playbook", "-i", inventory, "site.yml")
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
        runs.append(result.stdout)
    # The roles installed immune-edge with --no-deps (no package index in tests): the devices' venvs find
    # its dependencies in this venv, so the immune-edge they hold runs (the doctor gate runs it).
    for device in ("pi-1", "pi-2"):
        (site,) = (root / f"root-{device}/opt/immune-edge/venv/lib").glob("python3*/site-packages")
        (site / "test-dependencies.pth").write_text(f"{sysconfig.get_paths()['purelib']}\n")
    return Converged(root, port, runs)


def test_converge_is_idempotent(converged: Converged) -> None:
    first, second = (recap(run) for run in converged.runs)
    assert set(first) == {"localhost", "pi-1", "pi-2", "broker-1", "store-1"}
    assert all(counts["changed"] > 0 for counts in first.values())
    assert all(counts["changed"] == 0 and counts["failed"] == 0 for counts in second.values()), second


def test_roles_wrote_what_a_device_and_a_broker_need(converged: Converged) -> None:
    pi = converged.device_root("pi-1")
    config = load_config(pi / "etc/immune-edge/edge.toml", EdgeConfig)
    assert config.device.id == "pi-1" and config.device.groups == ["canary"]
    assert config.mqtt.tls is not None and config.mqtt.tls.cert_file == pi / "etc/immune-edge/tls/device.pem"
    assert (pi / "etc/immune-edge/tls/device.key").stat().st_mode & 0o777 == 0o600
    assert (pi / "opt/immune-edge/venv/bin/immune-edge").is_file()
    unit = pi / "etc/systemd/system/immune-edge.service"
    assert unit.read_text() == (REPO / "systemd/immune-edge.service").read_text()
    assert "MemoryMax=3G" in (pi / "etc/systemd/system/immune-edge.service.d/10-ansible.conf").read_text()
    assert all(
        (converged.pki / f"{name}.key").stat().st_mode & 0o777 == 0o600 for name in ("ca", "pi-1", "op-1")
    )
    acl = (converged.device_root("broker") / "etc/mosquitto/immune-edge/acl").read_text()
    assert "user pi-1\n" in acl and "topic read immune-edge/v1/lab/group/canary/desired" in acl
    assert "user op-1\n" in acl and "user trainer-1\n" in acl


def test_artifact_store_role_wrote_a_tls_models_site(converged: Converged) -> None:
    """The artifact store converged: its pki-issued certificate, the key private to it, and an nginx
    site serving the models folder (Range requests, no listing) over TLS on the configured port."""
    store = converged.root / "root-store"
    tls = store / "etc/nginx/immune-edge"
    assert (tls / "server.key").stat().st_mode & 0o777 == 0o600
    assert (tls / "server.pem").read_bytes() == (converged.pki / "store-1.pem").read_bytes()
    assert (store / "srv/immune-edge/models").is_dir()
    site = (store / "etc/nginx/sites-enabled/immune-edge-models.conf").read_text()
    assert "listen 8443 ssl;" in site and "server_name store-1;" in site
    assert "ssl_certificate /etc/nginx/immune-edge/server.pem;" in site
    assert "alias /srv/immune-edge/models/;" in site and "autoindex off;" in site
    assert "location /wheels/" not in site  # no wheelhouse given: none served


@pytest.fixture
def broker_of_role(converged: Converged, tmp_path: Path) -> Iterator[None]:
    with role_broker(
        converged.device_root("broker") / "etc/mosquitto/conf.d", converged.broker_port, tmp_path
    ):
        yield


def test_role_broker_serves_a_role_configured_device(
    converged: Converged, broker_of_role, fleet_keys, tmp_path
) -> None:
    operator = TlsClient(converged.pki, "op-1", converged.broker_port)
    operator.client.subscribe(f"{TOPICS.base}/#", qos=1)
    pi2 = TlsClient(converged.pki, "pi-2", converged.broker_port)
    try:
        with ArtifactServer(tmp_path / "artifacts") as server:
            data = gguf_bytes()
            url = server.add("model.gguf", data)
            config = converged.device_root("pi-1") / "etc/immune-edge/edge.toml"
            with running_daemon(config):
                envelope = sign_manifest([fleet_keys.trainer], data, url)
                operator.client.publish(TOPICS.desired_fleet(), envelope, qos=1, retain=True)
                states = lambda: [  # noqa: E731
                    json.loads(p)["state"] for t, p in operator.messages if t == TOPICS.events("pi-1")
                ]
                wait_until(lambda: "committed" in states(), timeout=60, what="pi-1 committed")
                # The role's config passes the checks the role runs on a real device.
                status, checks = run_doctor(config)
                assert status == 0, checks
                assert checks["tls"]["verdict"] == checks["broker"]["verdict"] == "pass", checks
                assert checks["model"]["verdict"] == "pass", checks
                # pi-2 may not speak for pi-1: the broker refuses the publish (v5 reason 0x87).
                forged = pi2.client.publish(TOPICS.status("pi-1"), b'{"forged": true}', qos=1)
                own = pi2.client.publish(TOPICS.events("pi-2"), b"{}", qos=1)
                wait_until(lambda: {forged.mid, own.mid} <= set(pi2.acks), timeout=10, what="PUBACKs")
                assert pi2.acks[forged.mid] == 0x87 and pi2.acks[own.mid] == 0
                # pi-2's own event, published after the forgery, is the signal: one client's messages
                # arrive in order, so a forged status let through would be here before it.
                wait_until(
                    lambda: (TOPICS.events("pi-2"), b"{}") in operator.messages,
                    timeout=10,
                    what="pi-2's event",
                )
                assert not any(b"forged" in p for _t, p in operator.messages)
                # The role's doctor gate, run on this healthy device, passes and changes nothing.
                gated = _converge_gated(converged, "pi-1")
                assert gated.returncode == 0, gated.stdout[-4000:]
                assert recap(gated.stdout)["pi-1"]["changed"] == 0
                assert "TASK [edge : Check the device with immune-edge doctor]" in gated.stdout
    finally:
        operator.close()
        pi2.close()


def _converge_gated(converged: Converged, device: str) -> subprocess.CompletedProcess[str]:
    """site.yml again for ``device`` alone, with the role's doctor gate on (it runs by default only where
    the role starts the service, which these throw-away roots have no systemd for)."""
    return run_ansible(
        BIN / "ansible-playbook", "-i", converged.root / "inventory.json", "site.yml",
        "--limit", device, "-e", "edge_doctor_gate=true",
    )  # fmt: skip


def test_the_doctor_gate_fails_the_play_on_an_unhealthy_device(converged: Converged) -> None:
    """No broker runs and no daemon serves: doctor fails on pi-2, so the play fails there, naming the
    gate, after its retries."""
    result = _converge_gated(converged, "pi-2")
    assert result.returncode != 0
    assert recap(result.stdout)["pi-2"]["failed"] == 1
    assert "FAILED - RETRYING: [pi-2]: Check the device with immune-edge doctor" in result.stdout
    fatal = next(line for line in result.stdout.splitlines() if line.startswith("fatal: [pi-2]: FAILED! => "))
    report = json.loads(json.loads(fatal.split(" => ", 1)[1])["stdout"])
    verdicts = {check["name"]: check["verdict"] for check in report["checks"]}
    assert verdicts["config"] == "pass" and verdicts["broker"] == "fail", verdicts


def test_rotate_keyring_playbook_reaches_running_and_provisioned_devices(
    converged: Converged, broker_of_role, fleet_keys, tmp_path
) -> None:
    """rotate-keyring.yml against the role's broker: the root-signed update is verified on the
    controller, published retained (mosquitto_pub, as the first operator), adopted by a running device
    from the broker, and installed as every device's anchor. An update the current roots did not sign
    stops the playbook before anything is published or copied."""
    new = fleet_keys.keyring(version=2)
    keyring_new = tmp_path / "keyring-v2.json"
    keyring_new.write_bytes(new.to_json())
    update = tmp_path / "update.dsse.json"
    update.write_bytes(sign_envelope(new.to_json(), KEYRING_PAYLOAD_TYPE, [fleet_keys.root]).to_json())
    forged = tmp_path / "forged.dsse.json"
    forged.write_bytes(sign_envelope(new.to_json(), KEYRING_PAYLOAD_TYPE, [fleet_keys.stranger]).to_json())

    def rotate(envelope: Path) -> subprocess.CompletedProcess[str]:
        return run_ansible(
            BIN / "ansible-playbook", "-i", converged.root / "inventory.json", "rotate-keyring.yml",
            "-e", f"keyring_update={envelope}", "-e", f"keyring_new={keyring_new}",
            "-e", f"current_keyring={converged.root / 'keyring.json'}",
        )  # fmt: skip

    anchors = [converged.device_root(d) / "etc/immune-edge/keyring.json" for d in ("pi-1", "pi-2")]
    config = converged.device_root("pi-1") / "etc/immune-edge/edge.toml"
    with running_daemon(config) as daemon:
        wait_until(lambda: daemon.control.trust.keyring.version == 1, timeout=30, what="keyring v1 in use")
        refused = rotate(forged)
        assert refused.returncode != 0 and "unknown-key" in refused.stdout, refused.stdout[-3000:]
        assert all(Keyring.from_json(a.read_bytes()).version == 1 for a in anchors)
        result = rotate(update)
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
        assert recap(result.stdout)["localhost"]["changed"] == 1  # the publish
        wait_until(lambda: daemon.control.trust.keyring.version == 2, timeout=60, what="keyring v2 adopted")
    assert all(anchor.read_bytes() == new.to_json() for anchor in anchors)
