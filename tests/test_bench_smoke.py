"""Short runs of the benchmarks under bench/, so a change that breaks one shows in `make test`; the
figures themselves come from the full runs recorded in docs/benchmarks.md."""

from __future__ import annotations

import subprocess
import sys


def test_api_chat_bench_runs_every_api_and_json_mode() -> None:
    command = [sys.executable, "-m", "bench.api_chat", "--rounds", "1", "--tokens", "8", "--prompts", "2"]
    command += ["--json-tokens", "96", "--no-baseline-server"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    for row in ("immune-edge OpenAI", "immune-edge Ollama", "immune-edge Anthropic", "OpenAI json_schema"):
        assert row in result.stdout, result.stdout
    assert "identical answers across engines: yes" in result.stdout


def test_adapters_bench_runs_on_synthetic_adapters() -> None:
    command = [sys.executable, "-m", "bench.adapters", "--synthetic", "--rounds", "1", "--requests", "4"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    for row in ("bytes for an update", "worker RSS, 2 tasks", "decode tokens/s", "p99 latency"):
        assert row in result.stdout, result.stdout
    assert "(0 failed), " in result.stdout and result.stdout.rstrip().endswith("(0 failed)")
