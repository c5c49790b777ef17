"""``immune-edge doctor``: the checks an operator would make before calling for help, each with a
verdict and a reason: config, keyring, TLS files, broker, store, current model, API endpoints,
sensors and the systemd unit. It reads the device's state but changes nothing a daemon relies on
(the store check writes and removes one probe file)."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import closing
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path

import httpx
from cryptography import x509
from pydantic import BaseModel

from edge.assembly import ControlPlane
from edge.config import EdgeConfig
from edge.control.trust import TrustStore
from edge.telemetry.host import HostSensors
from shared.artifacts import sha256_file
from shared.config import ConfigError, load_config
from shared.errors import ContractError
from shared.mqtt import mqtt_client

#: A client certificate this close to expiry is a warning: renewal is due.
CERT_WARN_BEFORE = timedelta(days=14)
UNIT = "immune-edge.service"
GIB = 1024**3


class Verdict(StrEnum):
    PASS = "pass"  # noqa: S105 (a verdict, not a password)
    WARN = "warn"
    FAIL = "fail"
    SKIP = "skip"


class Check(BaseModel):
    """One line of the report."""

    name: str
    verdict: Verdict
    detail: str


def _pass(name: str, detail: str) -> Check:
    return Check(name=name, verdict=Verdict.PASS, detail=detail)


def _warn(name: str, detail: str) -> Check:
    return Check(name=name, verdict=Verdict.WARN, detail=detail)


def _fail(name: str, detail: str) -> Check:
    return Check(name=name, verdict=Verdict.FAIL, detail=detail)


def _skip(name: str, detail: str) -> Check:
    return Check(name=name, verdict=Verdict.SKIP, detail=detail)


class DoctorReport(BaseModel):
    """What ``doctor --json`` prints (Ansible reads it)."""

    config: str
    device: str | None
    checks: list[Check]

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.verdict is Verdict.FAIL]


def examine(config_file: Path, timeout_s: float = 5.0) -> DoctorReport:
    """Run every check against the device configured in ``config_file``."""
    try:
        config = load_config(config_file, EdgeConfig)
    except ConfigError as exc:
        check = _fail("config", f"{exc.reason}: {exc}")
        return DoctorReport(config=str(config_file), device=None, checks=[check])
    checks = [_pass("config", f"{config_file} is valid")]
    for name, run in _checks(config, timeout_s):
        try:
            checks.append(run())
        except Exception as exc:  # a check that breaks is a finding, not the end of the report
            checks.append(_fail(name, f"the check itself failed: {exc}"))
    return DoctorReport(config=str(config_file), device=config.device.id, checks=checks)


def _checks(config: EdgeConfig, timeout_s: float) -> Iterator[tuple[str, Callable[[], Check]]]:
    """The checks in report order, by name."""
    yield "keyring", lambda: _keyring(config)
    yield "tls", lambda: _tls(config)
    yield "broker", lambda: _broker(config, timeout_s)
    yield "store", lambda: _store(config)
    yield "model", lambda: _model(config)
    yield "api", lambda: _api(config, timeout_s)
    yield "sensors", lambda: _sensors(config)
    yield "systemd", _systemd


def _keyring(config: EdgeConfig) -> Check:
    state_dir = config.state_dir
    try:
        keyring = TrustStore(config.keyring_file, state_dir).keyring
    except OSError as exc:
        return _fail("keyring", f"cannot read {config.keyring_file}: {exc.strerror}")
    except ContractError as exc:
        return _fail("keyring", f"{exc.reason}: {exc}")
    roles: dict[str, int] = {}
    for key in keyring.keys:
        roles[key.role.value] = roles.get(key.role.value, 0) + 1
    listed = ", ".join(f"{role} {n}" for role, n in sorted(roles.items()))
    missing = {"root", "trainer", "operator"} - set(roles)
    if missing:
        return _warn("keyring", f"version {keyring.version}: {listed}; no {', '.join(sorted(missing))} key")
    return _pass("keyring", f"version {keyring.version}: {listed}")


def _tls(config: EdgeConfig) -> Check:
    tls = config.mqtt.tls
    if tls is None:
        return _skip("tls", "not configured: plain MQTT")
    for path in (tls.ca_file, tls.cert_file, tls.key_file):
        if path is not None and not os.access(path, os.R_OK):
            return _fail("tls", f"cannot read {path}")
    try:
        ssl.create_default_context(cafile=str(tls.ca_file))
    except ssl.SSLError as exc:
        return _fail("tls", f"CA file {tls.ca_file}: {exc.reason}")
    if tls.cert_file is None:
        return _pass("tls", f"CA {tls.ca_file}; no client certificate")
    try:
        cert = x509.load_pem_x509_certificate(tls.cert_file.read_bytes())
    except ValueError as exc:
        return _fail("tls", f"client certificate {tls.cert_file}: {exc}")
    now, ends = datetime.now(UTC), cert.not_valid_after_utc
    subject = cert.subject.rfc4514_string()
    if now >= ends:
        return _fail("tls", f"client certificate {subject} expired {ends:%Y-%m-%d %H:%M} UTC")
    if now < cert.not_valid_before_utc:
        starts = cert.not_valid_before_utc
        detail = f"client certificate {subject} not valid before {starts:%Y-%m-%d %H:%M} UTC (clock?)"
        return _fail("tls", detail)
    if tls.key_file is not None and tls.key_file.stat().st_mode & 0o077:
        return _warn("tls", f"{tls.key_file} is readable by others (want 0600)")
    valid = f"client certificate {subject} valid until {ends:%Y-%m-%d}"
    return _warn("tls", f"{valid}: renew it") if ends - now < CERT_WARN_BEFORE else _pass("tls", valid)


def _broker(config: EdgeConfig, timeout_s: float) -> Check:
    settings = config.mqtt
    where = f"{settings.host}:{settings.port}"
    # Its own client id: connecting as the device would end the running daemon's session.
    client = mqtt_client(settings, f"{config.device.id}-doctor-{os.getpid()}")
    answered = threading.Event()
    outcome: list[str] = []

    def on_connect(client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        outcome.append("" if not reason_code.is_failure else str(reason_code))
        answered.set()

    client.on_connect = on_connect
    try:
        client.connect(settings.host, settings.port, keepalive=settings.keepalive_s)
    except (OSError, ssl.SSLError) as exc:
        return _fail("broker", f"cannot reach {where}: {exc}")
    client.loop_start()
    try:
        if not answered.wait(timeout_s):
            return _fail("broker", f"{where} did not answer in {timeout_s:.0f} s")
    finally:
        client.disconnect()
        client.loop_stop()
    if outcome[0]:
        return _fail("broker", f"{where} refused these credentials: {outcome[0]}")
    return _pass("broker", f"connected to {where}")


def _store(config: EdgeConfig) -> Check:
    store = config.store_dir
    if not store.is_dir():
        return _fail("store", f"{store} does not exist (never started?)")
    probe = store / f".doctor-{os.getpid()}"
    try:
        with probe.open("wb") as handle:
            handle.write(b"probe")
            os.fsync(handle.fileno())
        probe.unlink()
    except OSError as exc:
        return _fail("store", f"{store} is not writable: {exc.strerror}")
    free = shutil.disk_usage(store).free
    largest = max((p.stat().st_size for p in (store / "sha256").glob("*")), default=0)
    detail = f"{store} writable, {free / GIB:.1f} GiB free"
    if free < largest + config.download.free_space_margin_mb * 1024**2:
        return _warn("store", f"{detail}: not enough for another model of {largest / GIB:.1f} GiB")
    return _pass("store", detail)


def _model(config: EdgeConfig) -> Check:
    if not (config.state_dir / "state.db").is_file():
        return _warn("model", f"no state in {config.state_dir} yet (the daemon never ran)")
    node = ControlPlane.open(config)
    try:
        ledger = node.ledger
        installed = [m for slot in ["", *ledger.adapter_slots()] if (m := ledger.current(slot)) is not None]
        if not installed:
            return _warn("model", "no model installed yet")
        for model in installed:
            for entry in model.manifest.files:
                path = node.store.blob_path(entry.sha256)
                if not path.is_file():
                    return _fail("model", f"{model.name} #{model.serial}: {path} is missing")
                size, digest = sha256_file(path)
                if (size, digest) != (entry.size, entry.sha256):
                    detail = (
                        f"{model.name} #{model.serial}: {path} is corrupted (sha256 {digest[:16]}..., "
                        f"{size} bytes; its manifest says {entry.sha256[:16]}..., {entry.size} bytes)"
                    )
                    return _fail("model", detail)
        names = ", ".join(f"{m.name} #{m.serial}" for m in installed)
        return _pass("model", f"{names}: present, sha256 verified")
    finally:
        node.close()


def _api(config: EdgeConfig, timeout_s: float) -> Check:
    if not config.runtime.enabled:
        return _skip("api", "serving is off ([runtime] enabled = false)")
    api, found = config.api, []
    if api.host and api.port:
        url = f"http://{api.host}:{api.port}/health"
        if _answers(httpx.Client(timeout=timeout_s), url):
            found.append(f"serving on {api.host}:{api.port}")
        else:
            try:
                with closing(socket.create_server((api.host, api.port))):
                    found.append(f"{api.host}:{api.port} free")
            except OSError as exc:
                return _fail("api", f"{api.host}:{api.port} is taken by another program ({exc.strerror})")
    if api.socket is not None:
        transport = httpx.HTTPTransport(uds=str(api.socket))
        if api.socket.exists() and _answers(
            httpx.Client(transport=transport, timeout=timeout_s), "http://localhost/health"
        ):
            found.append(f"serving on {api.socket}")
        elif not api.socket.parent.is_dir():
            return _fail("api", f"{api.socket.parent} does not exist (for the socket)")
        else:
            found.append(f"{api.socket} can be created")
    return _pass("api", "; ".join(found))


def _answers(client: httpx.Client, url: str) -> bool:
    """Whether an immune-edge API answers at ``url`` (its /health says ok)."""
    with client:
        try:
            reply = client.get(url)
            return reply.status_code == 200 and reply.json().get("status") == "ok"
        except (httpx.HTTPError, ValueError, AttributeError):
            return False


def _sensors(config: EdgeConfig) -> Check:
    device = config.device
    readings = HostSensors(device.sysfs_root, device.procfs_root, config.telemetry.vcgencmd).read()
    problems = []
    if readings.soc_temp_c is None:
        problems.append(f"no thermal zone under {device.sysfs_root}")
    if readings.throttled_bits is None:
        problems.append("throttling flags unreadable (no firmware node, no vcgencmd)")
    if problems:
        return _warn("sensors", "; ".join(problems) + ": thermal back-off is blind")
    detail = f"SoC {readings.soc_temp_c:.1f} C, throttled bits {readings.throttled_bits:#x}"
    return _pass("sensors", detail)


def _systemd() -> Check:
    systemctl = shutil.which("systemctl")
    if systemctl is None or not Path("/run/systemd/system").is_dir():
        return _skip("systemd", "not running under systemd")
    state = subprocess.run([systemctl, "is-active", UNIT], capture_output=True, text=True).stdout.strip()
    if state == "active":
        return _pass("systemd", f"{UNIT} is active")
    detail = f"{UNIT} is {state or 'unknown'} (journalctl -u {UNIT})"
    return _fail("systemd", detail) if state == "failed" else _warn("systemd", detail)
