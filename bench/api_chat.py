"""Chat through each of immune-edge's three APIs against direct llama-cpp-python and llama-cpp-python's
own server, then the cost and effect of grammar-constrained JSON.

Part 1 (--part ttft): the same chat (ChatML, greedy) streamed by direct ``create_chat_completion``,
by immune-edge's OpenAI, Ollama and Anthropic endpoints and by llama_cpp.server, interleaved round
by round; time to first token and decode tokens/s, each as a ratio to direct in the same round.
Part 2 (--part json): the Slips risk prompts of tests/harness/risk_prompts.py through immune-edge
without a format, with json_object, with json_schema and with Ollama's format; tokens/s of each
against the unconstrained run, and how many answers parse and keep to the schema.

Run: .venv/bin/python -m bench.api_chat [--rounds 5] [--prompts 20] [--no-baseline-server]
(llama_cpp.server needs the bench extra: `make bench` installs it.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import jsonschema
from rich.console import Console
from rich.table import Table

from bench.api_throughput import process
from tests.harness.models import smollm2_gguf
from tests.harness.net import free_port
from tests.harness.risk_prompts import ALERTS, ASK, SCHEMA

console = Console(width=140)
N_CTX = 2048
MESSAGES = [
    {"role": "system", "content": "You are a network security analyst."},
    {"role": "user", "content": "List the ten most common signs that a host on a network is compromised."},
]
GREEDY = {"temperature": 0.0, "top_p": 0.95, "top_k": 40, "repeat_penalty": 1.1}


@dataclass
class Stream:
    ttft_s: float
    decode_rate: float
    text: str


def _timed(pieces: Iterator[str]) -> Stream:
    started = time.perf_counter()
    stamps, parts = [], []
    for piece in pieces:
        if piece:
            stamps.append(time.perf_counter())
            parts.append(piece)
    decode = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    return Stream(stamps[0] - started, decode, "".join(parts))


def _lines(client: httpx.Client, path: str, body: dict[str, Any]) -> Iterator[str]:
    with client.stream("POST", path, json=body) as reply:
        reply.raise_for_status()
        yield from reply.iter_lines()


def _sse(client: httpx.Client, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for line in _lines(client, path, body):
        if line.startswith("data: {"):
            yield json.loads(line[6:])


def openai_chat(client: httpx.Client, tokens: int) -> Iterator[str]:
    body = {"messages": MESSAGES, "max_tokens": tokens, "stream": True, **GREEDY}
    for chunk in _sse(client, "/v1/chat/completions", body):
        yield chunk["choices"][0]["delta"].get("content") or ""


def ollama_chat(client: httpx.Client, tokens: int) -> Iterator[str]:
    options = {"num_predict": tokens, **GREEDY}
    for line in _lines(client, "/api/chat", {"messages": MESSAGES, "options": options}):
        yield json.loads(line)["message"]["content"]


def anthropic_messages(client: httpx.Client, tokens: int) -> Iterator[str]:
    body = {
        "model": "smol",
        "system": MESSAGES[0]["content"],
        "messages": MESSAGES[1:],
        "max_tokens": tokens,
        "stream": True,
        "temperature": 0.0,
    }
    for event in _sse(client, "/v1/messages", body):
        if event["type"] == "content_block_delta":
            yield event["delta"]["text"]


def _serve_command(port: int, threads: int, *extra: str) -> list[str]:
    """``immune-edge serve`` of the bundled SmolLM2 as "smol" (ChatML) on ``port``."""
    command = [sys.executable, "-m", "edge.cli", "serve", "--model", str(smollm2_gguf()), "--name", "smol"]
    command += [
        "--port",
        str(port),
        "--threads",
        str(threads),
        "--n-ctx",
        str(N_CTX),
        "--chat-format",
        "chatml",
    ]
    return [*command, *extra]


def ttft(rounds: int, threads: int, tokens: int, baseline_server: bool) -> None:
    from llama_cpp import Llama

    model = str(smollm2_gguf())
    ours, theirs = free_port(), free_port()
    ours_cmd = _serve_command(ours, threads)
    theirs_cmd = [sys.executable, "-m", "llama_cpp.server", "--model", model, "--port", str(theirs)]
    theirs_cmd += ["--host", "127.0.0.1", "--n_threads", str(threads), "--n_threads_batch", str(threads)]
    theirs_cmd += ["--n_ctx", str(N_CTX), "--chat_format", "chatml"]
    llm = Llama(
        model, n_ctx=N_CTX, n_threads=threads, n_threads_batch=threads, chat_format="chatml", verbose=False
    )

    def direct(tokens: int) -> Iterator[str]:
        chunks = llm.create_chat_completion(MESSAGES, max_tokens=tokens, stream=True, **GREEDY)
        for chunk in chunks:
            yield chunk["choices"][0]["delta"].get("content") or ""

    with process(ours_cmd, f"http://127.0.0.1:{ours}/ready"):
        ours_client = httpx.Client(base_url=f"http://127.0.0.1:{ours}", timeout=600)
        engines: dict[str, Callable[[int], Iterator[str]]] = {
            "direct": direct,
            "immune-edge OpenAI": lambda n: openai_chat(ours_client, n),
            "immune-edge Ollama": lambda n: ollama_chat(ours_client, n),
            "immune-edge Anthropic": lambda n: anthropic_messages(ours_client, n),
        }
        if baseline_server:
            with process(theirs_cmd, f"http://127.0.0.1:{theirs}/v1/models"):
                theirs_client = httpx.Client(base_url=f"http://127.0.0.1:{theirs}", timeout=600)
                engines["llama_cpp.server"] = lambda n: openai_chat(theirs_client, n)
                results = _interleave(engines, rounds, tokens)
        else:
            results = _interleave(engines, rounds, tokens)
    _report_ttft(results, threads, tokens)


def _interleave(
    engines: dict[str, Callable[[int], Iterator[str]]], rounds: int, tokens: int
) -> dict[str, list[Stream]]:
    for run in engines.values():
        "".join(run(8))  # warm-up
    results: dict[str, list[Stream]] = {name: [] for name in engines}
    for r in range(rounds):
        for name, run in engines.items():
            "".join(run(tokens))  # a whole answer first: every engine then reuses the same prefix
            results[name].append(_timed(run(tokens)))
        console.print(f"round {r + 1}/{rounds} done")
    return results


def _report_ttft(results: dict[str, list[Stream]], threads: int, tokens: int) -> None:
    table = Table(title=f"chat streaming, SmolLM2-135M Q4_1, {threads} thread(s), {tokens} tokens, medians")
    for column in (
        "engine",
        "TTFT (ms)",
        "TTFT over direct (ms)",
        "TTFT / direct",
        "decode tok/s",
        "decode / direct",
    ):
        table.add_column(column, justify="left" if column == "engine" else "right")
    direct = results["direct"]
    for name, runs in results.items():
        over = [(a.ttft_s - b.ttft_s) * 1000 for a, b in zip(runs, direct, strict=True)]
        ratio = [a.ttft_s / b.ttft_s for a, b in zip(runs, direct, strict=True)]
        decode = [a.decode_rate / b.decode_rate for a, b in zip(runs, direct, strict=True)]
        table.add_row(
            name,
            f"{statistics.median(s.ttft_s for s in runs) * 1000:.1f}",
            f"{statistics.median(over):+.1f}",
            f"{statistics.median(ratio):.3f}x",
            f"{statistics.median(s.decode_rate for s in runs):.1f}",
            f"{statistics.median(decode):.3f}x",
        )
    console.print(table)
    texts = {name: {s.text for s in runs} for name, runs in results.items()}
    console.print(
        f"identical answers across engines: {'yes' if len(set.union(*texts.values())) == 1 else 'NO'}"
    )


def structured(count: int, threads: int, tokens: int) -> None:
    port = free_port()
    command = _serve_command(port, threads, "--max-tokens-cap", str(tokens))
    modes: dict[str, dict[str, Any]] = {
        "no format": {},
        "OpenAI json_object": {"response_format": {"type": "json_object"}},
        "OpenAI json_schema": {
            "response_format": {"type": "json_schema", "json_schema": {"name": "risk", "schema": SCHEMA}}
        },
        "Ollama format (schema)": {"format": SCHEMA},
    }
    rows = []
    with process(command, f"http://127.0.0.1:{port}/ready"):
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600)
        for mode, extra in modes.items():
            produced, seconds, parsed, valid, cut = 0, 0.0, 0, 0, 0
            for alert in ALERTS[:count]:
                text, generated, took, reason = _ask(client, ASK + alert, extra, tokens)
                produced, seconds = produced + generated, seconds + took
                cut += reason == "length"
                try:
                    answer = json.loads(text)
                    parsed += 1
                    jsonschema.validate(answer, SCHEMA)
                    valid += 1
                except (json.JSONDecodeError, jsonschema.ValidationError):
                    pass
            rows.append((mode, produced / seconds, parsed, valid, cut))
            console.print(f"{mode} done")
    table = Table(title=f"JSON through immune-edge, {count} Slips risk prompts, greedy, max {tokens} tokens")
    for column in ("mode", "tokens/s", "vs no format", "answers parse", "match the schema", "cut at max"):
        table.add_column(column, justify="left" if column == "mode" else "right")
    for mode, rate, parsed, valid, cut in rows:
        table.add_row(
            mode,
            f"{rate:.1f}",
            f"{rate / rows[0][1]:.3f}x",
            f"{parsed}/{count}",
            f"{valid}/{count}",
            str(cut),
        )
    console.print(table)


def _ask(
    client: httpx.Client, prompt: str, extra: dict[str, Any], tokens: int
) -> tuple[str, int, float, str]:
    messages = [{"role": "user", "content": prompt}]
    started = time.perf_counter()
    if "format" in extra:
        body = {"messages": messages, "stream": False, "options": {"temperature": 0, "num_predict": tokens}}
        reply = client.post("/api/chat", json=body | extra).raise_for_status().json()
        took = time.perf_counter() - started
        return reply["message"]["content"], reply["eval_count"], took, reply["done_reason"]
    body = {"messages": messages, "temperature": 0, "max_tokens": tokens}
    reply = client.post("/v1/chat/completions", json=body | extra).raise_for_status().json()
    took = time.perf_counter() - started
    choice = reply["choices"][0]
    return choice["message"]["content"], reply["usage"]["completion_tokens"], took, choice["finish_reason"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=64, help="answer length in the TTFT part")
    parser.add_argument("--prompts", type=int, default=len(ALERTS), help="risk prompts in the JSON part")
    parser.add_argument("--json-tokens", type=int, default=256)
    parser.add_argument("--no-baseline-server", action="store_true", help="leave llama_cpp.server out")
    parser.add_argument("--part", choices=("all", "ttft", "json"), default="all")
    args = parser.parse_args()
    if args.part in ("all", "ttft"):
        ttft(args.rounds, args.threads, args.tokens, not args.no_baseline_server)
    if args.part in ("all", "json"):
        structured(args.prompts, args.threads, args.json_tokens)


if __name__ == "__main__":
    main()
