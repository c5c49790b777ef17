"""Where the daemon's log lines go (journald only under systemd's journal stream), the structured
fields they carry, and the audit trail of refusals: rate-limited lines, exact counts."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from edge.api.app import create_app
from edge.api.generation import Serving
from edge.audit import MAX_KEYS, Audit, RefusalKind
from edge.logs import JsonFormatter, LogFormat, TextFormatter, choose_format, fields
from edge.metrics import Metrics
from edge.runtime.router import ModelRouter
from tests.harness.edge import DEVICE, TOPICS, ServingOptions, sign_command, sign_manifest, write_edge_config
from tests.harness.waiting import wait_until

CHOICE = "from edge.logs import setup_logging; print(setup_logging().value)"
REFUSAL_LOG = "[logging]\nrefusal_window_s = 3600\nrefusal_burst = 5\n"
NO_SYSTEMD = "import sys; sys.modules['systemd'] = sys.modules['systemd.journal'] = None; "


def _choice_with_stderr_on(stream: socket.socket | int, env: dict[str, str], code: str = CHOICE) -> str:
    clean = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    result = subprocess.run(
        [sys.executable, "-c", code], stderr=stream, stdout=subprocess.PIPE, text=True, env=clean | env
    )
    assert result.returncode == 0
    return result.stdout.strip()


def test_journald_is_chosen_only_for_the_stream_systemd_connected() -> None:
    """systemd puts a service's stderr on a socket to the journal and names it in JOURNAL_STREAM;
    here a socket of the test stands in for the journal's."""
    pytest.importorskip("systemd.journal")
    journal_side, ours = socket.socketpair()
    with journal_side, ours:
        info = os.fstat(ours.fileno())
        stream = f"{info.st_dev}:{info.st_ino}"
        assert _choice_with_stderr_on(ours, {"JOURNAL_STREAM": stream}) == "journal"
        # A terminal, a container, the demo: no JOURNAL_STREAM, or one inherited for another stream.
        assert _choice_with_stderr_on(ours, {}) == "text"
        assert _choice_with_stderr_on(subprocess.DEVNULL, {"JOURNAL_STREAM": stream}) == "text"
        assert _choice_with_stderr_on(ours, {"JOURNAL_STREAM": "garbage"}) == "text"
        # journald wanted, but systemd-python missing: text, not silence.
        assert _choice_with_stderr_on(ours, {"JOURNAL_STREAM": stream}, NO_SYSTEMD + CHOICE) == "text"


def test_a_journal_request_without_systemd_python_falls_back_to_stderr_and_says_so() -> None:
    code = NO_SYSTEMD + CHOICE.replace("setup_logging()", "setup_logging(False, LogFormat('journal'))")
    code = code.replace("import setup_logging", "import LogFormat, setup_logging")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "text"
    assert "journald logging needs systemd-python" in result.stderr


def test_explicit_formats_are_kept() -> None:
    assert choose_format(LogFormat.JSON, {}) is LogFormat.JSON
    assert choose_format(LogFormat.AUTO, {}) is LogFormat.TEXT


def _record(message: str, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("edge.test", logging.WARNING, __file__, 1, message, (), None)
    record.__dict__.update(fields(**extra))
    return record


def test_text_and_json_lines_carry_the_structured_fields() -> None:
    record = _record("refused manifest", reason="bad-signature", topic="immune/lab/desired", serial=7)
    text = TextFormatter().format(record)
    assert (
        "WARNING edge.test: refused manifest [serial=7 reason=bad-signature topic=immune/lab/desired]" in text
    )
    assert text[:4].isdigit() and "Z WARNING" in text  # an ISO time in UTC first
    entry = json.loads(JsonFormatter().format(record))
    assert entry["reason"] == "bad-signature" and entry["serial"] == 7 and entry["level"] == "WARNING"
    assert record.__dict__["REASON"] == "bad-signature"  # journald field REASON=bad-signature
    with pytest.raises(ValueError, match="unknown log fields: colour"):
        fields(colour="red")


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


COMMANDS = "immune/lab/device/pi-a/command"


def test_a_refusal_flood_is_counted_exactly_and_logged_a_bounded_number_of_times(caplog) -> None:
    clock = _Clock()
    audit = Audit(window_s=60, burst=5, clock=clock)
    with caplog.at_level(logging.WARNING, logger="edge.audit"):
        for _ in range(1000):
            audit.refused(RefusalKind.COMMAND, "bad-signature", COMMANDS, "no valid signature")
        assert len(caplog.records) == 1
        # Origins chosen by the attacker do not multiply the lines past the burst.
        for n in range(1000):
            audit.refused(RefusalKind.MESSAGE, "topic", f"immune/lab/x{n}", "bad topic")
        assert len(caplog.records) == 5
        assert audit.counts() == {("command", "bad-signature"): 1000, ("message", "topic"): 1000}
        assert audit.total() == 2000
        clock.now += 61  # the next window: the same refusal is logged again, with what was not
        audit.refused(RefusalKind.COMMAND, "bad-signature", COMMANDS, "no valid signature")
    assert len(caplog.records) == 6
    last = caplog.records[-1]
    assert "996 more refusals not logged" in last.getMessage()
    assert last.__dict__["REASON"] == "bad-signature" and last.__dict__["KIND"] == "command"
    assert len(audit._last_logged) <= MAX_KEYS


def _metric_sum(base_url: str, prefix: str) -> float:
    lines = httpx.get(f"{base_url}/metrics", timeout=10).text.splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.startswith(prefix))


def test_the_daemon_outside_systemd_logs_to_stderr_and_a_refusal_flood_stays_bounded(
    tmp_path: Path, mqtt_broker, fleet_keys, observer
) -> None:
    serving = ServingOptions()
    config = write_edge_config(
        tmp_path / "device", mqtt_broker, fleet_keys.keyring(), serving=serving, extra=REFUSAL_LOG
    )
    log_file = tmp_path / "stderr.log"
    clean = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    with log_file.open("w") as stderr:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "edge.cli", "run", "--config", str(config)], stderr=stderr, env=clean
        )
    try:
        wait_until(lambda: "subscribed" in log_file.read_text(), 60, "the daemon subscribed")
        # A manifest signed by a key the device does not trust: refused, and the refusal is a line
        # on stderr with its reason and where it came from.
        forged = sign_manifest([fleet_keys.stranger], b"GGUF" + bytes(60), "http://127.0.0.1:9/model.gguf")
        observer.publish(TOPICS.desired_fleet(), forged)
        line = wait_until(
            lambda: next((x for x in log_file.read_text().splitlines() if "refused manifest" in x), None),
            60,
            "the refusal on stderr",
        )
        assert "WARNING edge.audit" in line and "from desired:fleet" in line, line
        assert "reason=" in line and "kind=manifest" in line and "device=pi-1" in line, line

        # 1,000 forged commands: each refused and counted, a handful of lines in the log.
        before = len(log_file.read_text().splitlines())
        forged_command = sign_command([fleet_keys.stranger], {"action": "status"})
        for _ in range(1000):
            observer.client.publish(TOPICS.command(DEVICE), forged_command, qos=1)
        refused = 'immune_edge_refusals_total{kind="'
        wait_until(lambda: _metric_sum(serving.base_url, refused) >= 1001, 120, "1,001 refusals in /metrics")
        assert _metric_sum(serving.base_url, refused) == 1001  # the manifest and the commands
        flood_lines = log_file.read_text().splitlines()[before:]
        assert 1 <= len(flood_lines) <= 5, flood_lines[:10]  # REFUSAL_LOG's burst, and nothing else
        assert all("refused command" in x or "refused message" in x for x in flood_lines)
    finally:
        daemon.terminate()
        daemon.wait(timeout=60)


def test_an_unexpected_error_gives_a_stable_500_and_its_traceback_goes_to_the_log(caplog) -> None:
    router = ModelRouter()

    def broken(*_: object) -> None:
        raise RuntimeError("internal detail: pipe id 42, sampling {'top_k': 40}")

    router.admit = broken  # type: ignore[method-assign]  # a bug anywhere on the request's path
    app = create_app(Serving(router, Metrics()), Audit())
    with TestClient(app, raise_server_exceptions=False) as client, caplog.at_level(logging.ERROR):
        reply = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert reply.status_code == 500
    ident = reply.headers["x-request-id"]
    assert reply.json()["error"]["message"] == f"internal error (request id {ident})"
    assert "pipe id" not in reply.text
    (record,) = [r for r in caplog.records if r.name == "edge.api.app"]
    assert record.__dict__["REQUEST"] == ident and "pipe id 42" in caplog.text  # the traceback


def test_a_client_request_id_is_kept_when_it_is_safe() -> None:
    with TestClient(create_app(Serving(ModelRouter(), Metrics()), Audit())) as client:
        assert client.get("/health", headers={"x-request-id": "slips-4711-abcd"}).headers["x-request-id"] == (
            "slips-4711-abcd"
        )
        forged = client.get("/health", headers={"x-request-id": "a b\nWARNING forged"}).headers[
            "x-request-id"
        ]
        assert forged != "a b\nWARNING forged" and len(forged) == 16


def test_a_refused_api_token_is_audited_with_the_client_address(caplog) -> None:
    audit = Audit()
    app = create_app(Serving(ModelRouter(), Metrics()), audit, bearer_token="s3cret-token")
    with TestClient(app) as client, caplog.at_level(logging.WARNING, logger="edge.audit"):
        assert client.get("/v1/models").status_code == 401
        assert client.get("/v1/models", headers={"Authorization": "Bearer guess"}).status_code == 401
        assert client.get("/v1/models", headers={"x-api-key": "s3cret-token"}).status_code == 200
        metrics = client.get("/metrics", headers={"x-api-key": "s3cret-token"}).text
    assert audit.counts() == {("api-auth", "missing-token"): 1, ("api-auth", "wrong-token"): 1}
    assert 'immune_edge_refusals_total{kind="api-auth",reason="wrong-token"} 1.0' in metrics
    assert [r.__dict__["ORIGIN"] for r in caplog.records] == ["testclient", "testclient"]
    assert "s3cret" not in caplog.text and "guess" not in caplog.text  # credentials are not logged


def test_the_daemon_with_log_format_json_writes_one_object_per_line(
    tmp_path: Path, mqtt_broker, fleet_keys, observer
) -> None:
    """`immune-edge run --log-format json`: every stderr line is a JSON object with its time, level,
    logger, message and the structured fields (a refusal's reason and kind, the device id)."""
    config = write_edge_config(tmp_path / "device", mqtt_broker, fleet_keys.keyring())
    log_file = tmp_path / "stderr.log"
    with log_file.open("w") as stderr:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "edge.cli", "run", "--config", str(config), "--log-format", "json"],
            stderr=stderr,
        )
    try:
        wait_until(lambda: "subscribed" in log_file.read_text(), 60, "the daemon subscribed")
        forged = sign_manifest([fleet_keys.stranger], b"GGUF" + bytes(60), "http://127.0.0.1:9/model.gguf")
        observer.publish(TOPICS.desired_fleet(), forged)
        wait_until(lambda: "refused manifest" in log_file.read_text(), 60, "the refusal logged")
    finally:
        daemon.terminate()
        daemon.wait(timeout=60)
    entries = [json.loads(line) for line in log_file.read_text().splitlines()]  # each line parses
    assert all({"ts", "level", "logger", "message"} <= entry.keys() for entry in entries), entries
    assert all(entry.get("device") == "pi-1" or entry.get("DEVICE") == "pi-1" for entry in entries), entries[
        0
    ]
    refusal = next(entry for entry in entries if "refused manifest" in entry["message"])
    assert refusal["level"] == "WARNING" and refusal["logger"] == "edge.audit", refusal
    assert refusal.get("kind") == "manifest" and refusal.get("reason"), refusal
