"""Short runs of the benchmarks under bench/, so a change that breaks one shows in `make test`; the
figures themselves come from the full runs recorded in docs/benchmarks.md."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

#: Under pytest's own limit (pyproject.toml), so a bench that hangs fails with what it printed.
BENCH_TIMEOUT_S = 270


def _bench(command: list[str]) -> subprocess.CompletedProcess[str]:
    """Run a bench; its exit status must be 0, else the test fails with the tail of its output."""
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=BENCH_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        output = _text(exc.stdout) + _text(exc.stderr)
        raise AssertionError(f"{command[2]} ran past {BENCH_TIMEOUT_S} s:\n{output[-6000:]}") from None
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _text(output: str | bytes | None) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def test_api_chat_bench_runs_every_api_and_json_mode() -> None:
    command = [sys.executable, "-m", "bench.api_chat", "--rounds", "1", "--tokens", "8", "--prompts", "2"]
    command += ["--json-tokens", "96", "--no-baseline-server"]
    result = _bench(command)
    for row in ("immune-edge OpenAI", "immune-edge Ollama", "immune-edge Anthropic", "OpenAI json_schema"):
        assert row in result.stdout, result.stdout
    assert "identical answers across engines: yes" in result.stdout


def test_adapters_bench_runs_on_synthetic_adapters() -> None:
    command = [sys.executable, "-m", "bench.adapters", "--synthetic", "--rounds", "1", "--requests", "4"]
    command += ["--swap-every", "1"]
    result = _bench(command)
    for row in ("bytes for an update", "worker RSS, 2 tasks", "decode tokens/s", "p99 latency"):
        assert row in result.stdout, result.stdout
    assert "(0 failed), " in result.stdout and result.stdout.rstrip().endswith("(0 failed)")


def test_fleet_scale_bench_converges_through_its_faults(tmp_path) -> None:
    """20 simulated devices: 2 killed before the rollout, the broker restarted in the last wave, the
    first downloads answered 503, devices started at most 300 a minute. Every online device commits,
    no event is lost."""
    out = tmp_path / "scale.json"
    command = [sys.executable, "-m", "bench.fleet_scale", "--devices", "20", "--processes", "2", "--faults"]
    command += ["--rate", "300"]
    _bench([*command, "--json", str(out)])
    (run,) = json.loads(out.read_text())
    assert run["rollout_status"] == "done" and run["status_cli_rows"] == 20
    assert (run["committed"], run["offline"], run["failed"]) == (18, 2, 0)
    assert run["events_expected"] == run["events_received"] == 7 * 18
    assert run["refused_downloads"] > 0 and any("broker restarted" in note for note in run["notes"])
    assert run["rollout_s"] >= 17 * 60 / 300  # the 18 online devices were started 0.2 s apart at least
    # immune-fleet collect, running through the broker restart, stored every event of the rollout.
    assert run["collect_events"] == run["events_expected"] and run["collect_rss_mb"] > 0
    # Counted across the broker restart (a restarted mosquitto counts from zero: this was negative). Not
    # "> 0": 20 devices can cost mosquitto less than one 10 ms tick of CPU time in all.
    assert run["messages_per_s"] > 0 and run["mosquitto_cpu_s"] >= 0


def test_fleet_scale_bench_shares_one_read_only_copy_of_the_model(tmp_path) -> None:
    """10 devices link one 4 MiB seed: nothing is downloaded and one copy is on disk."""
    out = tmp_path / "scale.json"
    command = [sys.executable, "-m", "bench.fleet_scale", "--devices", "10", "--processes", "1"]
    _bench([*command, "--shared-cache", "--json", str(out)])
    (run,) = json.loads(out.read_text())
    assert run["rollout_status"] == "done" and run["committed"] == 10
    assert run["downloaded_mb"] == 0 and 4.0 <= run["stored_mb"] < 4.1


def test_soak_bench_runs_a_short_soak_with_swaps(tmp_path) -> None:
    out = tmp_path / "soak.json"
    # Whether requests fail is the long soak's verdict (docs/benchmarks.md); 45 s on a CI machine
    # shared with other jobs proves the bench runs: swaps, samples, the drained outbox.
    command = [sys.executable, "-m", "bench.soak", "--minutes", "0.75", "--swap-every", "10"]
    command += ["--report-only", "--json", str(out)]
    _bench(command)
    figures = json.loads(out.read_text())
    assert figures["requests"] > 0 and len(figures["failures"]) == figures["failed"]
    assert figures["unsent_outbox_at_end"] == 0 and len(figures["samples"]) >= 3
    assert len(figures["swaps"]) >= 2 and all(s.endswith("committed") for s in figures["swaps"])


def test_quant_speed_bench_measures_every_pi5_candidate() -> None:
    command = [sys.executable, "-m", "bench.quant_speed", "--rounds", "1", "--prompt-tokens", "64"]
    command += ["--decode-tokens", "4", "--threads", "1"]
    result = _bench(command)
    for quant in ("q4_0", "q4_k_m", "q5_k_m", "q6_k", "q8_0", "q4_1", "q5_0"):
        assert f"\n{quant} | " in result.stdout, result.stdout


def test_capture_cost_bench_compares_capture_on_and_off() -> None:
    command = [sys.executable, "-m", "bench.capture_cost", "--requests", "1", "--max-tokens", "4"]
    result = _bench([*command, "--max-estimate", "700"])
    assert "median TTFT (ms)" in result.stdout, result.stdout
    assert "captured: 2 stored, 0 dropped" in result.stdout, result.stdout


def test_capture_loop_bench_captures_pulls_prepares_and_distills() -> None:
    command = [sys.executable, "-m", "bench.capture_loop", "--incidents", "1", "--steps", "0"]
    out = Path(tempfile.mkdtemp()) / "loop"
    _bench([*command, "--out", str(out)])
    figures = json.loads((out / "results.json").read_text())
    assert figures["pull"][0]["pulled"] == figures["captured_on_device"]["stored"] > 0, figures
    assert figures["distilled_train_records"] + figures["prepare"]["eval"] > 0, figures
