"""The Raspberry Pi 5 target, emulated: an arm64 Debian 12 root (qemu-user), the Pi wheelhouse built by
`immune-fleet pi wheels` and installed by the edge role through Ansible's chroot connection (twice, the second
run changing nothing), with no package index and no compiler in the root. Then, inside the root: `immune-edge
serve` answers a fixed Slips prompt greedily and its tokens are compared with this machine's; a delivery round
(signed manifest over the role's mosquitto, `immune-edge run` to `committed`, one chat request); and
`immune-edge doctor` passes. A wheelhouse missing a wheel or holding another architecture's is refused by the
role before the device changes.

Emulation is slow (tens of times native): the model work is a few short requests. The root and the
cross-compiled wheels are cached under ~/.cache/immune-edge, so only the first run builds them
(`make arm64-check`; docs/benchmarks.md has the times)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from packaging.utils import canonicalize_name

from fleet.pi.index import INDEX_FILE, WheelhouseIndex, wheel_entries, write_index
from fleet.pi.root import Chroot, base_root, copy_root
from fleet.pi.target import PI5
from fleet.pi.wheelhouse import build_wheelhouse
from tests.harness.artifact_server import ArtifactServer
from tests.harness.edge import TOPICS, sign_manifest
from tests.harness.net import free_port
from tests.harness.provisioning import BIN, REPO, TlsClient, recap, role_broker, run_ansible
from tests.harness.waiting import wait_until
from trainer.prompts.alert_summary import AlertSummaryProfile
from trainer.prompts.profile import IncidentFacts

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(3600),
    # debootstrap, chroot and the mounts need root; CI runs as root.
    pytest.mark.skipif(os.geteuid() != 0, reason="the arm64 check needs root: run `make test` as root"),
]

DEVICE = "pi-arm"
VENV = "/opt/immune-edge/venv"
CONFIG = "/etc/immune-edge/edge.toml"
#: Greedy tokens compared across the two machines: few, because emulated decoding is slow.
ANSWER_TOKENS = 12


@dataclass(frozen=True)
class Fleet:
    """What the converge left: the device root, the controller's pki and the broker's root."""

    scratch: Path
    device: Path
    wheelhouse: Path
    broker_port: int
    api_port: int
    runs: list[str]

    @property
    def pki(self) -> Path:
        return self.scratch / "pki"


def _inventory(scratch: Path, devices: dict[str, Path], wheelhouse: Path, keyring: Path,
               broker_port: int, api_port: int) -> Path:  # fmt: skip
    controller = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
    device_vars = {
        "ansible_connection": "community.general.chroot",
        "ansible_python_interpreter": "/usr/bin/python3",
        # Root inside the root already; there is no sudo in it.
        "ansible_become": False,
        "immune_manage_system": True,
        "edge_start_service": False,
        "edge_wheelhouse": str(wheelhouse),
        "edge_keyring_file": str(keyring),
        "edge_mqtt_host": "localhost",
        "edge_mqtt_port": broker_port,
        "edge_api_port": api_port,
        "edge_trial_s": 5.0,
        "edge_n_threads": 2,
    }
    inventory = {
        "all": {
            "vars": {
                "immune_fleet": "lab",
                "immune_fleet_bin": str(BIN / "immune-fleet"),
                "pki_dir": str(scratch / "pki"),
                "fleet_operators": ["op-1"],
                "fleet_trainers": ["trainer-1"],
                "broker_port": broker_port,
                "broker_bind_address": "127.0.0.1",
            },
            "hosts": {"localhost": controller},
            "children": {
                "pi_fleet": {
                    "hosts": {
                        name: {**device_vars, "ansible_host": str(root)} for name, root in devices.items()
                    }
                },
                "brokers": {
                    "hosts": {
                        "broker-1": {
                            **controller,
                            "immune_root": str(scratch / "root-broker"),
                            "immune_manage_system": False,
                            "server_alt_names": ["DNS:localhost", "IP:127.0.0.1"],
                        }
                    }
                },
            },
        }
    }
    path = scratch / f"inventory-{'-'.join(devices)}.json"
    path.write_text(json.dumps(inventory))
    return path


def _converge(inventory: Path, *limit: str) -> subprocess.CompletedProcess[str]:
    extra = ["--limit", ",".join(limit)] if limit else []
    return run_ansible(BIN / "ansible-playbook", "-i", inventory, "site.yml", *extra)


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    started = time.monotonic()
    out = tmp_path_factory.mktemp("pi5") / "wheels"
    build_wheelhouse(out, REPO, PI5)
    print(f"wheelhouse built in {time.monotonic() - started:.0f} s")  # noqa: T201 (figures for docs/benchmarks.md)
    return out


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, wheelhouse: Path, fleet_keys) -> Fleet:
    scratch = tmp_path_factory.mktemp("arm64")
    device = copy_root(base_root(PI5), scratch / "root-pi")
    keyring = scratch / "keyring.json"
    keyring.write_bytes(fleet_keys.keyring().to_json())
    broker_port, api_port = free_port(), free_port()
    inventory = _inventory(scratch, {DEVICE: device}, wheelhouse, keyring, broker_port, api_port)
    runs = []
    with Chroot(device):
        for _ in range(2):
            started = time.monotonic()
            result = _converge(inventory)
            assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
            print(f"converge in {time.monotonic() - started:.0f} s")  # noqa: T201 (figures for docs/benchmarks.md)
            runs.append(result.stdout)
    return Fleet(scratch, device, wheelhouse, broker_port, api_port, runs)


def test_the_role_installs_the_wheelhouse_twice_changing_nothing_the_second_time(fleet: Fleet) -> None:
    first, second = (recap(run)[DEVICE] for run in fleet.runs)
    assert first["changed"] > 0 and first["failed"] == 0
    assert second["changed"] == 0 and second["failed"] == 0, fleet.runs[1][-4000:]
    root = fleet.device
    # No compiler and no build tools: everything came from the wheelhouse, by hash, with no index.
    assert not any((root / "usr/bin" / tool).exists() for tool in ("gcc", "cc", "cmake", "g++"))
    assert (root / "etc/systemd/system/multi-user.target.wants/immune-edge.service").is_symlink()
    with Chroot(root) as chroot:
        machine = chroot.run([f"{VENV}/bin/python", "-c", "import platform; print(platform.machine())"])
        assert machine.stdout.strip() == "aarch64"
        listed = chroot.run([f"{VENV}/bin/python", "-m", "pip", "list", "--format", "json"]).stdout
    installed = {canonicalize_name(p["name"]): p["version"] for p in json.loads(listed)}
    assert installed["llama-cpp-python"] == "0.3.36"
    assert "systemd-python" in installed and "immune-edge" in installed


def _wheelhouse_copy(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest)
    return dest


def _refused(fleet: Fleet, broken: Path, name: str) -> str:
    device = copy_root(base_root(PI5), fleet.scratch / f"root-{name}")
    inventory = _inventory(fleet.scratch, {name: device}, broken, fleet.scratch / "keyring.json",
                           fleet.broker_port, fleet.api_port)  # fmt: skip
    with Chroot(device):
        result = _converge(inventory, "localhost", name)
    assert result.returncode != 0
    # Refused before any change on the device: no install folder, no user, no config.
    assert not (device / "opt/immune-edge").exists() and not (device / "etc/immune-edge").exists()
    assert "immune-edge" not in (device / "etc/passwd").read_text()
    return result.stdout


def test_a_wheelhouse_missing_a_wheel_is_refused_before_the_device_changes(fleet: Fleet) -> None:
    broken = _wheelhouse_copy(fleet.wheelhouse, fleet.scratch / "missing-wheel")
    (numpy,) = broken.glob("numpy-*.whl")
    numpy.unlink()
    output = _refused(fleet, broken, "pi-missing")
    assert f"{numpy.name} is listed in wheelhouse.json but missing" in output


def test_a_wheelhouse_for_another_architecture_is_refused_before_the_device_changes(
    fleet: Fleet, tmp_path: Path
) -> None:
    # This machine's own llama-cpp-python wheel put where the aarch64 one was, index and pins redone, as a
    # careless rebuild would: the tags and the libraries inside give it away.
    broken = _wheelhouse_copy(fleet.wheelhouse, fleet.scratch / "x86-wheel")
    (llama,) = broken.glob("llama_cpp_python-*.whl")
    host_wheels = sorted((REPO / ".cache/wheels").glob("llama-*/llama_cpp_python-*.whl"))
    assert host_wheels, "the x86_64 llama-cpp-python wheel of `make venv` is missing"
    llama.unlink()
    shutil.copyfile(host_wheels[0], broken / host_wheels[0].name)
    _reindex(broken)
    output = _refused(fleet, broken, "pi-x86")
    assert f"{host_wheels[0].name} cannot install on pi5" in output
    assert "ELF machine 62, the target's is 183" in output


def _reindex(folder: Path) -> None:
    old = WheelhouseIndex.model_validate_json((folder / INDEX_FILE).read_bytes())
    write_index(folder, old.model_copy(update={"wheels": wheel_entries(folder)}))


def _slips_request() -> dict[str, object]:
    """A fixed alert-summary-v2 final request (a small incident: emulated prompts are slow), made greedy."""
    source = "192.168.1.20"
    lines = ["Incident: arm64-check", f"Source IP: {source} | Timewindow: 4", ""]
    for index in range(3):
        lines.append(f"• 10:0{index} - Connection to 10.1.{index}.9 on port 443 [HIGH]")
        lines += [f"  - Connection to service svc{index} at 10.1.{index}.{copy}:443 from {source}. "
                  "threat level: high. Confidence: 0.8" for copy in (2, 3)]  # fmt: skip
    incident = IncidentFacts(
        incident_id="arm64-check", source_ip=source, text="\n".join(lines), timewindow="4",
        timeline="2024-04-05 10:00:00 to 2024-04-05 11:00:00", threat_level=12.5, event_count=6,
    )  # fmt: skip
    (final,) = AlertSummaryProfile().requests(incident, lambda *_: "")
    return {"model": "slips", "messages": final.messages, "max_tokens": ANSWER_TOKENS, "temperature": 0.0,
            "seed": 1}  # fmt: skip


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:] if log.is_file() else ""


def _started(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    """A long-running process whose output goes to ``log`` (a pipe nobody reads would fill and block it)."""
    with log.open("ab") as sink:
        return subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT)


def _serve(command: list[str], port: int, model: str, log: Path, timeout: float) -> subprocess.Popen[bytes]:
    argv = [*command, "serve", "--model", model, "--port", str(port), "--name", "slips", "--n-ctx", "2048",
            "--threads", "2", "--request-timeout", str(timeout)]  # fmt: skip
    return _started(argv, log)


def _answer(process: subprocess.Popen[bytes], port: int, timeout: float, log: Path) -> dict[str, object]:
    base = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"serve exited: {_tail(log)}")
            try:
                return httpx.get(f"{base}/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, timeout=timeout, what="serve ready")
        started = time.monotonic()
        response = httpx.post(f"{base}/v1/chat/completions", json=_slips_request(), timeout=timeout)
        assert response.status_code == 200, response.text
        body = response.json()
        body["seconds"] = time.monotonic() - started
        return body
    finally:
        process.terminate()
        process.wait(timeout=60)


def test_the_greedy_answer_to_a_slips_prompt_is_the_same_on_aarch64_and_x86_64(
    fleet: Fleet, smollm2_model: Path
) -> None:
    model_in_root = fleet.device / "srv/models" / smollm2_model.name
    model_in_root.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(smollm2_model, model_in_root)
    port = free_port()
    native_log, emulated_log = fleet.scratch / "serve-x86_64.log", fleet.scratch / "serve-aarch64.log"
    native_serve = _serve([sys.executable, "-m", "edge.cli"], port, str(smollm2_model), native_log, 120)
    native = _answer(native_serve, port, 120, native_log)
    emulated_serve = ["chroot", str(fleet.device), f"{VENV}/bin/immune-edge"]
    with Chroot(fleet.device):  # the mounts serve needs inside the root, for as long as it runs
        process = _serve(emulated_serve, port, f"/srv/models/{smollm2_model.name}", emulated_log, 1800)
        emulated = _answer(process, port, 1800, emulated_log)
    native_text = native["choices"][0]["message"]["content"]  # type: ignore[index]
    emulated_text = emulated["choices"][0]["message"]["content"]  # type: ignore[index]
    print(f"x86_64 ({native['seconds']:.1f} s): {native_text!r}")  # noqa: T201 (figures for docs/benchmarks.md)
    print(f"aarch64 emulated ({emulated['seconds']:.1f} s): {emulated_text!r}")  # noqa: T201 (figures for docs/benchmarks.md)
    assert native["usage"] == emulated["usage"]  # same prompt tokens: the same tokenizer and template
    assert emulated_text == native_text


def test_a_delivery_round_inside_the_root_then_doctor_passes(
    fleet: Fleet, fleet_keys, smollm2_model: Path, tmp_path: Path
) -> None:
    broker_conf = fleet.scratch / "root-broker/etc/mosquitto/conf.d"
    with (
        role_broker(broker_conf, fleet.broker_port, tmp_path),
        ArtifactServer(tmp_path / "artifacts") as server,
        Chroot(fleet.device) as chroot,
    ):
        # The operator connects once the broker is up (the role left it stopped after the converge).
        operator = TlsClient(fleet.pki, "op-1", fleet.broker_port)
        operator.client.subscribe(f"{TOPICS.base}/#", qos=1)
        url = server.add_file(smollm2_model, "smollm2.gguf")
        log = tmp_path / "daemon.log"
        run = ["chroot", str(fleet.device), f"{VENV}/bin/immune-edge", "run", "--config", CONFIG]
        daemon = _started(run, log)
        try:
            runtime = {"chat_format": "chatml", "n_ctx": 2048, "stop": ["<|im_end|>"]}
            arm = {"cpu_arch": ["aarch64"]}
            data = smollm2_model.read_bytes()
            envelope = sign_manifest([fleet_keys.trainer], data, url, compatibility=arm, runtime=runtime)
            operator.client.publish(TOPICS.desired_fleet(), envelope, qos=1, retain=True)

            def states() -> list[str]:
                if daemon.poll() is not None:
                    raise AssertionError(f"the daemon exited: {_tail(log)}")
                events = TOPICS.events(DEVICE)
                return [json.loads(p)["state"] for t, p in operator.messages if t == events]

            wait_until(lambda: "committed" in states(), timeout=900, what=f"{DEVICE} committed")
            print(f"events: {states()}")  # noqa: T201 (figures for docs/benchmarks.md)
            response = httpx.post(
                f"http://127.0.0.1:{fleet.api_port}/v1/chat/completions",
                json={"model": "slips", "messages": [{"role": "user", "content": "Say hello."}],
                      "max_tokens": 4, "temperature": 0.0},
                timeout=600,
            )  # fmt: skip
            assert response.status_code == 200, response.text
            print(f"chat: {response.json()['choices'][0]['message']['content']!r}")  # noqa: T201 (figures for docs/benchmarks.md)
            doctor = chroot.run([f"{VENV}/bin/immune-edge", "doctor", "--config", CONFIG, "--json"],
                                check=False, timeout=300)  # fmt: skip
            checks = {c["name"]: c for c in json.loads(doctor.stdout)["checks"]}
            assert doctor.returncode == 0, checks
            assert checks["broker"]["verdict"] == checks["model"]["verdict"] == "pass", checks
        finally:
            daemon.terminate()
            daemon.wait(timeout=60)
            operator.close()
