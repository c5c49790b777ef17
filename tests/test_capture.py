"""Capture end to end: real `immune-edge run` daemons serving the real SmolLM2 on a real broker, Slips-style
requests over HTTP, `immune-fleet capture pull|status|purge` over the signed command channel, and
`immune-train prepare --from-capture` on the operator's archive.

One device captures (the ``slips`` alias only, IPv4 and MAC addresses redacted, a bearer token on TCP),
one does not. A third runs with its capture file on a full tmpfs: capture stops, serving does not."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from edge.daemon import EdgeDaemon
from shared.capture_archive import CaptureArchive
from shared.signing import write_private_key
from tests.conftest import FleetKeys
from tests.harness.artifact_server import ArtifactServer
from tests.harness.broker import Mosquitto
from tests.harness.edge import (
    FLEET,
    TOPICS,
    FleetObserver,
    ServingOptions,
    running_daemon,
    sign_command,
    sign_manifest,
    write_edge_config,
)
from tests.harness.slips_fixture import corpus_of, write_slips_fixture
from tests.harness.tiny_llama import build_tiny_llama
from tests.harness.tmpfs import small_tmpfs
from tests.harness.training import immune_train
from tests.harness.waiting import wait_until
from trainer.dataset.records import read_records
from trainer.measure import captured_answers
from trainer.prompts.alert_summary import AlertSummaryProfile
from trainer.prompts.profile import IncidentFacts

pytestmark = pytest.mark.slow

CAPTURING, PLAIN = "pi-cap", "pi-off"
TOKEN = "capture-test-token-0123456789"
RUNTIME = {"chat_format": "chatml", "n_ctx": 2048, "stop": ["<|im_end|>"]}
FLEET_CLI = [sys.executable, "-m", "fleet.cli"]
#: Small budgets make Slips' reduction layers happen on small (fast) prompts: same format, fewer tokens.
PROFILE = AlertSummaryProfile(input_budget=560, reduction_budget=380)
MAC = "aa:bb:cc:00:11:22"


@dataclass
class Site:
    root: Path
    broker: Mosquitto
    observer: FleetObserver
    keys: FleetKeys
    daemons: dict[str, EdgeDaemon]
    apis: dict[str, ServingOptions]
    operator_config: Path

    @property
    def archive(self) -> Path:
        return self.root / "archive.db"

    def cli(self, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [*FLEET_CLI, "capture", *map(str, args), "--config", str(self.operator_config)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if check:
            assert result.returncode == 0, result.stdout + result.stderr
        return result

    def chat(
        self, device: str, messages: list[dict[str, str]], model: str = "slips", **extra: Any
    ) -> httpx.Response:
        headers = {"Authorization": f"Bearer {TOKEN}"} if device == CAPTURING else {}
        body = {"model": model, "messages": messages, "max_tokens": 12, "temperature": 0.0} | extra
        response = httpx.post(
            f"{self.apis[device].base_url}/v1/chat/completions", json=body, headers=headers, timeout=120
        )
        return response

    def captured(self, device: str = CAPTURING) -> int:
        recorder = self.daemons[device].data.capture  # type: ignore[union-attr]
        assert recorder is not None and recorder.drain()
        return recorder.store.held().records


def _capture_section(models: str = '["slips"]', extra: str = "") -> str:
    return (
        f'[capture]\nenabled = true\nmodels = {models}\nredact = ["ipv4", "mac"]\nmax_mb = 0.05\n'
        f"pause_after_error_s = 1\n{extra}"
    )


@pytest.fixture(scope="module")
def site(
    tmp_path_factory: pytest.TempPathFactory, fleet_keys: FleetKeys, smollm2_model: Path
) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("capture")
    token_file = root / "token"
    token_file.write_text(TOKEN)
    write_private_key(fleet_keys.operator, root / "operator.key")
    with ExitStack() as stack:
        broker = stack.enter_context(Mosquitto(root / "broker"))
        server = stack.enter_context(ArtifactServer(root / "artifacts"))
        observer = FleetObserver(broker)
        stack.callback(observer.close)
        operator_config = root / "fleet.toml"
        operator_config.write_text(
            f'fleet = "{FLEET}"\noperator = "op-1"\noperator_keys = ["{root / "operator.key"}"]\n'
            f'data_dir = "{root / "operator"}"\n\n[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\n'
        )
        apis = {
            CAPTURING: ServingOptions(api=f'bearer_token_file = "{token_file}"'),
            PLAIN: ServingOptions(),
        }
        daemons = {}
        for device, serving in apis.items():
            extra = _capture_section() if device == CAPTURING else ""
            config = write_edge_config(
                root / device, broker, fleet_keys.keyring(), device=device, serving=serving, extra=extra
            )
            daemons[device] = stack.enter_context(running_daemon(config))
        url = server.add_file(smollm2_model)
        envelope = sign_manifest([fleet_keys.trainer], smollm2_model.read_bytes(), url, runtime=RUNTIME)
        observer.publish(TOPICS.desired_fleet(), envelope)
        observer.wait_for(
            lambda: (
                {e["device_id"] for e in observer.unique_events() if e["state"] == "committed"} >= set(apis)
            ),
            300,
            "both devices committed",
        )
        yield Site(root, broker, observer, fleet_keys, daemons, apis, operator_config)


SERVICES = ("http", "ssh", "dns", "smtp", "rdp", "smb", "ftp", "ntp")


def _incident(number: int, patterns: int = 2) -> IncidentFacts:
    source = f"192.168.7.{number}"
    lines = [f"Incident: alert-{number}", f"Source IP: {source} | Timewindow: 3", ""]
    for index, service in enumerate(SERVICES[:patterns]):
        lines.append(f"• 10:{index:02d} - Connection to 203.0.113.{index + 1} [HIGH]")
        lines += [
            f"  - Unusual {service} traffic to 203.0.113.{index + 1}:{8000 + copy} from {source} ({MAC}). "
            "threat level: high. Confidence: 0.9"
            for copy in range(2)
        ]
    return IncidentFacts(
        incident_id=f"alert-{number}",
        source_ip=source,
        text="\n".join(lines),
        timewindow="3",
        timeline="2024-04-05 10:00:00 to 2024-04-05 11:00:00",
        threat_level=9.5,
        event_count=2 * patterns,
    )


def _slips_requests(site: Site, device: str, incident: IncidentFacts) -> list[httpx.Response]:
    """What Slips sends for ``incident`` (reductions first when over the budget), each answered by the
    device; a reduction's answer becomes the next layer's digest item, as in Slips."""
    responses: list[httpx.Response] = []

    def reduce(request, facts):  # type: ignore[no-untyped-def]
        response = site.chat(device, request.messages, temperature=request.temperature)
        responses.append(response)
        return response.json()["choices"][0]["message"]["content"] or "no answer"

    final = PROFILE.requests(incident, reduce)[-1]
    responses.append(site.chat(device, final.messages, temperature=final.temperature))
    return responses


def _pull(site: Site, device: str = CAPTURING, *extra: str) -> list[dict[str, Any]]:
    return json.loads(
        site.cli("pull", "--device", device, "--archive", site.archive, "--json", *extra).stdout
    )


def test_a_device_without_capture_stores_nothing_and_says_so(site: Site) -> None:
    response = site.chat(PLAIN, [{"role": "user", "content": "Say hello."}])
    assert response.status_code == 200
    assert not (site.root / PLAIN / "state" / "capture.db").exists()
    status = json.loads(site.cli("status", "--device", PLAIN, "--json").stdout)[PLAIN]
    assert status["capture_enabled"] is False and status["capture_records"] == 0
    refused = site.cli("pull", "--device", PLAIN, "--archive", site.root / "other.db", "--json", check=False)
    assert refused.returncode == 2
    assert json.loads(refused.stdout)[0]["error"] == "no capture store: capture was never enabled"


def test_slips_requests_are_captured_redacted_pulled_once_and_deduplicated(site: Site) -> None:
    site.daemons[CAPTURING].capture.purge()  # type: ignore[union-attr]
    incident = _incident(1, patterns=6)  # over the small budget: reductions, then the final
    responses = _slips_requests(site, CAPTURING, incident)
    assert [r.status_code for r in responses] == [200] * len(responses) and len(responses) >= 3
    # Not captured: a request refused at authentication, and one for a model name not configured.
    unauthenticated = httpx.post(
        f"{site.apis[CAPTURING].base_url}/v1/chat/completions",
        json={"model": "slips", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4},
        timeout=60,
    )
    assert unauthenticated.status_code == 401
    other_name = site.daemons[CAPTURING].data.router.active.name  # type: ignore[union-attr]
    assert (
        site.chat(CAPTURING, [{"role": "user", "content": "Say hello."}], model=other_name).status_code == 200
    )
    assert site.captured() == len(responses)

    rows = _pull(site)
    assert rows[0]["pulled"] == rows[0]["new"] == len(responses) and rows[0]["error"] is None
    archive = CaptureArchive(site.archive, create=False)
    exchanges = list(archive.exchanges())
    archive.close()
    assert len(exchanges) == len(responses)
    served = site.daemons[CAPTURING].data.router.active  # type: ignore[union-attr]
    texts = []
    for archived in exchanges:
        exchange = archived.exchange
        assert exchange.requested_model == "slips" and exchange.model_name == served.name
        assert served.key and exchange.model_serial == served.key[1]
        assert exchange.model_sha256 == served.sha256
        assert exchange.prompt_version == "alert-summary-v2" and exchange.redacted == ["ipv4", "mac"]
        assert exchange.max_tokens == 12 and exchange.temperature == 0.2 and exchange.prompt_tokens > 0
        assert [s.device for s in archived.sightings] == [CAPTURING]
        texts.append(" ".join(m.content for m in exchange.messages) + exchange.answer)
    joined = "\n".join(texts)
    assert incident.source_ip not in joined and MAC not in joined and "203.0.113.1" not in joined
    # The same source is the same placeholder in every request of the capture store.
    placeholders = {
        line.split(": ", 1)[1]
        for text in texts
        for line in text.splitlines()
        if line.startswith("- Source IP")
    }
    assert len(placeholders) == 1 and placeholders.pop().startswith("10.0.0.")
    # The cursor: a second pull sends nothing again; a new request is the only new exchange.
    assert _pull(site)[0]["pulled"] == 0
    assert site.chat(CAPTURING, _incident_messages(2)).status_code == 200
    assert site.captured() == len(responses) + 1
    assert _pull(site)[0]["new"] == 1


def _incident_messages(number: int) -> list[dict[str, str]]:
    return PROFILE.final_request(_incident(number), ["- a small digest line"], 1, 0).messages


def test_a_pull_must_be_signed_by_an_operator_and_cannot_be_replayed(site: Site) -> None:
    assert site.chat(CAPTURING, _incident_messages(7)).status_code == 200
    assert site.captured() >= 1
    pull = {"action": "capture_pull"}
    forged = site.observer.command(
        sign_command([site.keys.trainer], pull, device=CAPTURING), device=CAPTURING
    )
    assert forged["ok"] is False and "capture" not in forged
    assert "signature" in forged["error"] or "operator" in forged["error"], forged["error"]
    signed = json.loads(sign_command([site.keys.operator], pull, device=CAPTURING))
    unsigned = json.dumps({**signed, "signatures": []}).encode()
    refused = site.observer.command(unsigned, device=CAPTURING)
    assert refused["ok"] is False and "capture" not in refused, refused
    envelope = sign_command([site.keys.operator], pull, device=CAPTURING)
    first = site.observer.command(envelope, device=CAPTURING)
    assert first["ok"] is True and first["capture"]["exchanges"]
    audit = site.daemons[CAPTURING].control.audit
    replays = audit.counts().get(("command", "replayed"), 0)
    site.observer.send_command(envelope, device=CAPTURING)  # the same signed pull again
    wait_until(
        lambda: audit.counts().get(("command", "replayed"), 0) == replays + 1, 30, "the replay audited"
    )
    assert site.observer.responses.empty()  # refused without an answer: nothing was sent twice


def test_the_byte_budget_holds_and_the_oldest_go_first(site: Site) -> None:
    daemon = site.daemons[CAPTURING]
    daemon.capture.purge()  # type: ignore[union-attr]
    for number in range(10, 40):
        assert site.chat(CAPTURING, _incident_messages(number)).status_code == 200
    assert site.captured() > 0
    held = daemon.capture.held()  # type: ignore[union-attr]
    assert held.bytes <= daemon.config.capture.max_bytes
    assert held.first_seq is not None and held.last_seq is not None
    assert held.records < 30 and held.last_seq - held.first_seq + 1 == held.records  # the newest kept
    status = json.loads(site.cli("status", "--device", CAPTURING, "--json").stdout)[CAPTURING]
    assert status["capture_records"] == held.records and status["capture_bytes"] == held.bytes


def test_purge_what_was_pulled_then_everything(site: Site) -> None:
    daemon = site.daemons[CAPTURING]
    _pull(site)
    assert site.chat(CAPTURING, _incident_messages(99)).status_code == 200
    assert site.captured() >= 1
    before = daemon.capture.held()  # type: ignore[union-attr]
    site.cli("purge", "--device", CAPTURING, "--pulled-only", "--archive", site.archive, "--yes")
    after = daemon.capture.held()  # type: ignore[union-attr]
    assert after.records == 1 and after.store_id == before.store_id  # only the unpulled one is left
    site.cli("purge", "--device", CAPTURING, "--yes")
    emptied = daemon.capture.held()  # type: ignore[union-attr]
    assert emptied.records == 0 and emptied.store_id != before.store_id
    # A pull after the store changed starts from its beginning, not from the old cursor.
    assert site.chat(CAPTURING, _incident_messages(100)).status_code == 200
    assert site.captured() == 1
    assert _pull(site)[0]["pulled"] == 1


def test_prepare_from_capture_keeps_every_alert_on_one_side_of_the_split(site: Site, tmp_path: Path) -> None:
    daemon = site.daemons[CAPTURING]
    daemon.capture.purge()  # type: ignore[union-attr]
    archive = tmp_path / "archive.db"
    incidents = [_incident(number, patterns=6 if number % 2 else 2) for number in range(50, 56)]
    sent = sum(len(_slips_requests(site, CAPTURING, incident)) for incident in incidents)
    assert site.chat(CAPTURING, [{"role": "user", "content": "Not a Slips prompt."}]).status_code == 200
    assert site.captured() == sent + 1
    site.cli("pull", "--device", CAPTURING, "--archive", archive)
    summary, risk = write_slips_fixture(tmp_path / "data")
    tokenizer = build_tiny_llama(tmp_path / "base", corpus_of(summary, risk))
    out = tmp_path / "prepared"
    result = immune_train(
        "prepare", "--from-capture", archive, "--prompt-profile", "alert-summary-v2",
        "--tokenizer", tokenizer, "--output", out, "--eval-fraction", "0.25",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    train, held_out = list(read_records(out / "train.jsonl")), list(read_records(out / "eval.jsonl"))
    assert len(train) + len(held_out) == sent and held_out
    assert not {r.group for r in train} & {r.group for r in held_out}
    assert {r.meta["request"] for r in train + held_out} == {"final", "reduction"}
    assert all(r.teacher == "device:" + r.meta["captured_models"] for r in train + held_out)
    # The device model's own answers stay with each record: eval --baseline-captured scores them.
    baseline = captured_answers(held_out)
    assert (
        len(baseline.tasks) == len(held_out)
        and baseline.answers[0]["answer"] == held_out[0].meta["captured_answer"]
    )
    assert all(any(name.endswith("one_paragraph") for name in row) for row in baseline.tasks)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["records"]["captured"] == sent
    assert any("not a alert-summary-v2 request" in p for p in stats["problems"]), stats["problems"]
    # The captured answers are the device model's: training on them is refused until distilled.
    config = tmp_path / "train.toml"
    train_file, run_dir = out / "train.jsonl", tmp_path / "run"
    config.write_text(f'base_model = "{tokenizer}"\ntrain_file = "{train_file}"\noutput_dir = "{run_dir}"\n')
    refused = immune_train("finetune", "--config", config, check=False)
    assert refused.returncode != 0 and "run immune-train distill" in refused.stderr


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs for the capture file."""
    with small_tmpfs(tmp_path / "capture-disk", "1m") as mount_point:
        yield mount_point


def test_a_full_disk_stops_capture_and_serving_goes_on(site: Site, full_disk: Path, tmp_path: Path) -> None:
    serving = ServingOptions()
    capture_file = full_disk / "capture.db"
    config = write_edge_config(
        tmp_path / "pi-full", site.broker, site.keys.keyring(), device="pi-full", serving=serving,
        extra=_capture_section("[]", f'file = "{capture_file}"\n'),
    )  # fmt: skip
    filler = full_disk / "filler"
    with running_daemon(config) as daemon:
        site.observer.wait_for(
            lambda: any(
                e["device_id"] == "pi-full" and e["state"] == "committed"
                for e in site.observer.unique_events()
            ),
            300,
            "pi-full committed",
        )
        site.apis["pi-full"] = serving
        recorder = daemon.data.capture  # type: ignore[union-attr]
        assert recorder is not None
        # Fill what the store left free, then ask: every request is answered, none is captured.
        with filler.open("wb") as sink:
            try:
                while True:
                    sink.write(b"\0" * 65536)
                    sink.flush()
            except OSError:
                pass
        for number in range(5):
            assert site.chat("pi-full", _incident_messages(200 + number)).status_code == 200
        assert recorder.drain()
        assert recorder.counts.failed >= 1 and recorder.counts.stored == 0
        status = json.loads(site.cli("status", "--device", "pi-full", "--json").stdout)["pi-full"]
        assert status["capture_failed"] >= 1 and status["capture_stored"] == 0
        # Space again: after its pause, capture resumes by itself.
        filler.unlink()
        wait_until(lambda: not recorder.paused, 10, "the capture pause over")
        assert site.chat("pi-full", _incident_messages(300)).status_code == 200
        assert recorder.drain() and recorder.counts.stored == 1
