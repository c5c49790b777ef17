"""The shipped unit: ``systemd-analyze verify`` clean, ``systemd-analyze security`` exposure <= 2.5, and
the daemon's sd_notify protocol (READY, watchdog pings, STOPPING) seen on a real notify socket."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness.edge import write_edge_config

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "immune-edge.service"
ANALYZE = shutil.which("systemd-analyze")
pytestmark = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze missing (make test installs systemd)"
)


def _installed_copy(tmp_path: Path) -> Path:
    """The unit as the edge role installs it, pointing at this venv's immune-edge instead of /opt."""
    text = UNIT.read_text().replace(
        "/opt/immune-edge/venv/bin/immune-edge", str(Path(sys.executable).parent / "immune-edge")
    )
    copy = tmp_path / UNIT.name
    copy.write_text(text)
    return copy


def test_unit_verifies_clean(tmp_path: Path) -> None:
    result = subprocess.run(
        [ANALYZE, "verify", str(_installed_copy(tmp_path))], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_unit_exposure_is_at_most_2_5(tmp_path: Path) -> None:
    result = subprocess.run(
        [ANALYZE, "security", "--offline=true", "--no-pager", str(_installed_copy(tmp_path))],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    match = re.search(r"Overall exposure level for immune-edge.service: (\d+\.\d+)", result.stdout)
    assert match, result.stdout[-2000:] + result.stderr
    assert float(match.group(1)) <= 2.5


def test_unit_hardening_settings_are_present() -> None:
    text = UNIT.read_text()
    for line in (
        "Type=notify", "WatchdogSec=", "Restart=on-failure", "StartLimitBurst=", "User=immune-edge",
        "StateDirectory=immune-edge", "ConfigurationDirectory=immune-edge", "ProtectSystem=strict",
        "ProtectHome=yes", "PrivateTmp=yes", "NoNewPrivileges=yes", "CapabilityBoundingSet=\n",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6", "SystemCallFilter=@system-service", "MemoryMax=",
    ):  # fmt: skip
        assert line in text, line


def test_daemon_speaks_sd_notify(tmp_path: Path, mqtt_broker, fleet_keys) -> None:
    pytest.importorskip("systemd.daemon", reason="systemd-python not installed (immune-edge[systemd])")
    config = write_edge_config(tmp_path / "device", mqtt_broker, fleet_keys.keyring())
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(30)
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "1000000"}
    daemon = subprocess.Popen(
        [str(Path(sys.executable).parent / "immune-edge"), "run", "--config", str(config)],
        env=env, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        received: list[str] = []
        while sum("WATCHDOG=1" in m for m in received) < 3:
            received.append(notify.recv(4096).decode())
        assert received[0].startswith("READY=1") and "STATUS=device pi-1" in received[0]
        daemon.send_signal(signal.SIGTERM)
        while "STOPPING=1" not in received[-1]:
            received.append(notify.recv(4096).decode())
        assert daemon.wait(timeout=30) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
        notify.close()
