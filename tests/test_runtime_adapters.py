"""One base, many LoRA adapters: the real SmolLM2 GGUF in one worker process with adapters chosen per
request by model name, added, replaced and removed while clients keep sending requests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from edge.assembly import DataPlane, HostPaths
from edge.config import ApiSettings, RuntimeSettings, ThermalSettings
from edge.control.activation import ActivationError
from edge.runtime.health import GateCriteria
from edge.state.db import StateDB
from edge.state.ledger import Ledger
from edge.telemetry.host import HostSensors
from edge.telemetry.sampler import TelemetrySampler
from shared.manifest import RuntimeProfile
from shared.messages import Telemetry
from tests.harness.load import LoadClients
from tests.harness.lora_fixture import write_lora
from tests.harness.net import free_port
from tests.harness.serve import serving
from tests.harness.waiting import wait_until

QUESTION = "Summarise: host 10.0.0.5 scanned 200 ports in 3 seconds, then connected to 10.0.0.9:4444."


@dataclass
class Plane:
    plane: DataPlane
    base_url: str
    adapters: dict[str, Path]

    def ask(self, model: str, content: str = QUESTION) -> httpx.Response:
        body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 24}
        return httpx.post(f"{self.base_url}/v1/chat/completions", json=body | {"temperature": 0}, timeout=120)

    def answer(self, model: str) -> str:
        reply = self.ask(model)
        assert reply.status_code == 200, reply.text
        return reply.json()["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def plane(tmp_path_factory, smollm2_model) -> Iterator[Plane]:
    folder = tmp_path_factory.mktemp("adapters")
    adapters = {
        f"lora-{seed}": write_lora(folder / f"lora-{seed}.gguf", smollm2_model, seed) for seed in (1, 2, 3, 4)
    }
    port = free_port()
    api = ApiSettings(host="127.0.0.1", port=port, socket=None, aliases=["slips"])
    plane = DataPlane(api, RuntimeSettings(n_threads=1), ThermalSettings(), None, HostPaths())
    plane.start()
    try:
        plane.runtime.serve_file(
            smollm2_model, "smollm2-base", RuntimeProfile(chat_format="chatml", n_ctx=1024)
        )
        yield Plane(plane, f"http://127.0.0.1:{port}", adapters)
    finally:
        plane.close()


def test_two_adapters_share_one_worker_and_each_answers_as_itself(plane: Plane) -> None:
    runtime, router = plane.plane.runtime, plane.plane.router
    runtime.adapters.serve("slips-summary", plane.adapters["lora-1"], key="summary-1")
    runtime.adapters.serve("slips-risk", plane.adapters["lora-2"], key="risk-1")
    listed = [m["id"] for m in httpx.get(f"{plane.base_url}/v1/models").json()["data"]]
    assert listed == ["smollm2-base", "slips", "slips-risk", "slips-summary"]  # adapters by name

    base, summary, risk = (plane.answer(m) for m in ("smollm2-base", "slips-summary", "slips-risk"))
    assert len({base, summary, risk}) == 3, (base, summary, risk)
    # Switching drops the previous adapter's KV state: answers do not depend on what ran before.
    assert (plane.answer("slips-summary"), plane.answer("smollm2-base")) == (summary, base)
    assert plane.answer("slips-risk") == risk

    worker = router.active.worker
    assert all(a.worker is worker for a in router.adapters)
    # Worker processes are multiprocessing spawns (the resource tracker is not one).
    workers = [p for p in psutil.Process().children(recursive=True) if "spawn_main" in " ".join(p.cmdline())]
    assert [p.pid for p in workers] == [worker.pid]
    assert sorted(worker.adapters) == ["risk-1", "summary-1"]
    metrics = httpx.get(f"{plane.base_url}/metrics").text
    assert 'immune_edge_adapter_serving{adapter="slips-risk",version="risk-1"} 1.0' in metrics
    assert 'immune_edge_adapter_serving{adapter="slips-summary",version="summary-1"} 1.0' in metrics


def test_telemetry_and_metrics_report_each_adapter(plane: Plane, tmp_path: Path) -> None:
    runtime, metrics = plane.plane.runtime, plane.plane.metrics
    runtime.adapters.serve("slips-summary", plane.adapters["lora-1"], key="summary-1")
    runtime.adapters.serve("risk.v2", plane.adapters["lora-2"], key="risk-2")
    sensors = HostSensors(tmp_path / "sys", tmp_path / "proc", vcgencmd=None)
    ledger = Ledger(StateDB(tmp_path / "state.db"))
    sampler = TelemetrySampler("pi-a", "lab", sensors, ledger, tmp_path, runtime, metrics)
    before = sampler.sample().adapter_figures()
    plane.answer("slips-summary")
    plane.answer("slips-summary")
    plane.answer("smollm2-base")
    sample = sampler.sample()
    after = sample.adapter_figures()
    assert {"slips_summary", "risk_v2"} <= set(after)  # names made key-safe
    assert after["slips_summary"]["requests_total"] == before["slips_summary"]["requests_total"] + 2
    assert after["slips_summary"]["tokens_per_second"] > 0
    assert after["risk_v2"]["requests_total"] == before["risk_v2"]["requests_total"]
    assert "tokens_per_second" not in after["risk_v2"]  # it served nothing in this interval
    assert Telemetry.model_validate_json(sample.model_dump_json()) == sample  # it travels as is
    text = httpx.get(f"{plane.base_url}/metrics").text
    ok = 'immune_edge_model_requests_total{model="slips-summary",outcome="ok"}'
    assert float(next(line for line in text.splitlines() if line.startswith(ok)).split()[-1]) >= 2
    assert 'immune_edge_model_completion_tokens_total{model="smollm2-base"}' in text
    runtime.adapters.remove("risk.v2")


def test_adapters_added_replaced_and_removed_under_load_fail_no_request(plane: Plane) -> None:
    runtime = plane.plane.runtime
    runtime.adapters.serve("slips-summary", plane.adapters["lora-1"], key="summary-1")
    before = plane.answer("slips-summary")
    with LoadClients(plane.base_url, clients=4, model="slips-summary") as load:
        load.wait_for_requests(4)
        runtime.adapters.serve("slips-triage", plane.adapters["lora-3"], key="triage-1")
        load.wait_for_requests(4)
        runtime.adapters.serve("slips-summary", plane.adapters["lora-4"], key="summary-2")  # replaced
        load.wait_for_requests(4)
        runtime.adapters.remove("slips-triage")
        load.wait_for_requests(4)
    assert load.failures() == [] and len(load.snapshot()) >= 16
    assert {o.model for o in load.snapshot()} == {"slips-summary"}
    assert plane.answer("slips-summary") != before  # the new version answers
    assert plane.ask("slips-triage").status_code == 404
    assert 'adapter="slips-triage"' not in httpx.get(f"{plane.base_url}/metrics").text
    assert "summary-1" not in plane.plane.router.active.worker.adapters


def test_an_adapter_failing_its_gate_is_not_served_and_the_others_keep_serving(plane: Plane) -> None:
    runtime = plane.plane.runtime
    runtime.adapters.serve("slips-risk", plane.adapters["lora-2"], key="risk-1")
    risk = plane.answer("slips-risk")
    slow = GateCriteria(golden_prompts=("Say hello.",), min_tokens_per_second=1e9)
    with pytest.raises(ActivationError) as refused:
        runtime.adapters.serve("slips-risk", plane.adapters["lora-3"], key="risk-2", criteria=slow)
    assert refused.value.reason == "health-gate-slow"
    assert plane.answer("slips-risk") == risk  # still the version that passed
    assert "risk-2" not in plane.plane.router.active.worker.adapters
    with pytest.raises(ActivationError, match="names already served: smollm2-base") as clash:
        runtime.adapters.serve("smollm2-base", plane.adapters["lora-3"], key="clash")
    assert clash.value.reason == "name-clash"


def test_an_adapter_made_for_another_base_is_refused_by_llama_cpp(
    plane: Plane, tmp_path, gemma3_model
) -> None:
    foreign = write_lora(tmp_path / "gemma-lora.gguf", gemma3_model, seed=5)
    with pytest.raises(ActivationError) as refused:
        plane.plane.runtime.adapters.serve("slips-gemma", foreign, key="gemma-1")
    assert refused.value.reason == "load-failed" and "could not load the adapter" in str(refused.value)
    assert plane.plane.router.active.worker.alive
    assert plane.ask("smollm2-base").status_code == 200


def test_a_restarted_worker_loads_its_adapters_again(plane: Plane) -> None:
    runtime, router = plane.plane.runtime, plane.plane.router
    runtime.adapters.serve("slips-summary", plane.adapters["lora-1"], key="summary-1")
    summary = plane.answer("slips-summary")
    dead = router.active.worker
    os.kill(dead.pid, signal.SIGKILL)
    wait_until(lambda: router.active.worker is not dead and router.active.worker.alive, 120, "a new worker")
    assert all(a.worker is router.active.worker for a in router.adapters)
    assert plane.answer("slips-summary") == summary


def test_serve_with_adapters_from_the_command_line(plane: Plane, tmp_path, smollm2_model) -> None:
    risk = plane.adapters["lora-2"]
    with serving(
        smollm2_model, tmp_path / "api.sock", "--chat-format", "chatml", "--adapter", f"slips-risk={risk}"
    ) as s:
        listed = [m["id"] for m in httpx.get(f"{s.base}/v1/models").json()["data"]]
        assert listed == [smollm2_model.stem, "slips-risk"]
        body = {"model": "slips-risk", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 24}
        reply = httpx.post(f"{s.base}/v1/chat/completions", json=body | {"temperature": 0}, timeout=120)
        assert reply.json()["choices"][0]["message"]["content"] == plane.answer("slips-risk")
    refused = subprocess.run(
        [sys.executable, "-m", "edge.cli", "serve", "--model", str(risk)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert refused.returncode == 1 and "a GGUF adapter, not a model" in refused.stderr
