"""Serving overhead: tokens/sec and time to first token through immune-edge's API against direct
llama-cpp-python and against llama-cpp-python's own server, on the same model, thread count, raw
prompt and greedy sampling (so all three generate the same tokens), interleaved round by round.
Then the prefix-reuse saving on Slips alert-summary prompts built from ../shared/datasets/slips.

Run: .venv/bin/python -m bench.api_throughput [--rounds 5] [--threads 1]
(`make bench` installs the llama-cpp-python server extra this needs.)
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from tests.harness.models import smollm2_gguf
from tests.harness.net import free_port
from tests.harness.slips_prompts import INSTRUCTIONS, SYSTEM_PROMPT, incident_texts, summary_messages

console = Console()
N_CTX = 4096
GEN_PROMPT = "Here is a numbered list of forty well-known TCP ports and the services that use them:\n1."
SAMPLING = {"temperature": 0.0, "top_p": 0.95, "top_k": 40, "min_p": 0.05, "repeat_penalty": 1.1}


@dataclass
class Sample:
    text: str
    tokens: int
    prompt_tokens: int
    seconds: float
    ttft: float = 0.0
    decode_rate: float = 0.0

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds


@contextmanager
def process(command: list[str], ready_url: str) -> Iterator[None]:
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    try:
        while True:
            try:
                if httpx.get(ready_url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{command[2]} did not start")
            time.sleep(0.3)
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=30)


class HttpEngine:
    """An OpenAI-compatible /v1/completions endpoint."""

    def __init__(self, base: str, extra: dict[str, Any]) -> None:
        self.client = httpx.Client(base_url=base, timeout=600)
        self.extra = extra

    def complete(self, prompt: str, max_tokens: int) -> Sample:
        body = {"prompt": prompt, "max_tokens": max_tokens, **self.extra}
        started = time.perf_counter()
        data = self.client.post("/v1/completions", json=body).raise_for_status().json()
        seconds = time.perf_counter() - started
        usage = data["usage"]
        return Sample(data["choices"][0]["text"], usage["completion_tokens"], usage["prompt_tokens"], seconds)

    def stream(self, prompt: str, max_tokens: int) -> Sample:
        body = {"prompt": prompt, "max_tokens": max_tokens, "stream": True, **self.extra}
        started = time.perf_counter()
        stamps, parts = [], []
        with self.client.stream("POST", "/v1/completions", json=body) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    text = httpx.Response(200, content=line[6:]).json()["choices"][0].get("text") or ""
                    if text:
                        stamps.append(time.perf_counter())
                        parts.append(text)
        return _streamed(parts, stamps, started)


class DirectEngine:
    """llama-cpp-python in this process, as the baseline."""

    def __init__(self, threads: int) -> None:
        from llama_cpp import Llama

        self.llm = Llama(
            model_path=str(smollm2_gguf()),
            n_ctx=N_CTX,
            n_batch=512,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )

    def complete(self, prompt: str, max_tokens: int) -> Sample:
        started = time.perf_counter()
        data = self.llm.create_completion(prompt, max_tokens=max_tokens, **SAMPLING)
        seconds = time.perf_counter() - started
        usage = data["usage"]
        return Sample(data["choices"][0]["text"], usage["completion_tokens"], usage["prompt_tokens"], seconds)

    def stream(self, prompt: str, max_tokens: int) -> Sample:
        started = time.perf_counter()
        stamps, parts = [], []
        for chunk in self.llm.create_completion(prompt, max_tokens=max_tokens, stream=True, **SAMPLING):
            if text := chunk["choices"][0]["text"]:
                stamps.append(time.perf_counter())
                parts.append(text)
        return _streamed(parts, stamps, started)


def _streamed(parts: list[str], stamps: list[float], started: float) -> Sample:
    decode = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    return Sample("".join(parts), len(parts), 0, stamps[-1] - started, stamps[0] - started, decode)


Engine = Callable[[str, int], Sample]


def overhead(rounds: int, threads: int, tokens: int, prompt_cache_mb: int = 0) -> None:
    model = str(smollm2_gguf())
    ours_port, theirs_port = free_port(), free_port()
    ours_cmd = [sys.executable, "-m", "edge.cli", "serve", "--model", model, "--port", str(ours_port)]
    ours_cmd += ["--threads", str(threads), "--n-ctx", str(N_CTX), "--max-tokens-cap", "4096"]
    ours_cmd += ["--prompt-cache-mb", str(prompt_cache_mb)]
    theirs_cmd = [sys.executable, "-m", "llama_cpp.server", "--model", model, "--port", str(theirs_port)]
    theirs_cmd += ["--host", "127.0.0.1", "--n_threads", str(threads), "--n_threads_batch", str(threads)]
    theirs_cmd += ["--n_ctx", str(N_CTX)]
    incidents = incident_texts(rounds)
    with (
        process(ours_cmd, f"http://127.0.0.1:{ours_port}/ready"),
        process(theirs_cmd, f"http://127.0.0.1:{theirs_port}/v1/models"),
    ):
        engines = {
            "direct": DirectEngine(threads),
            "immune-edge": HttpEngine(f"http://127.0.0.1:{ours_port}", {"temperature": 0.0}),
            "llama_cpp.server": HttpEngine(f"http://127.0.0.1:{theirs_port}", SAMPLING),
        }
        results: dict[str, dict[str, list[Sample]]] = {
            n: {"gen": [], "stream": [], "pp": []} for n in engines
        }
        for engine in engines.values():
            engine.complete(GEN_PROMPT, 8)  # warm-up
        for r in range(rounds):
            for name, engine in engines.items():
                results[name]["gen"].append(engine.complete(GEN_PROMPT, tokens))
                results[name]["stream"].append(engine.stream(GEN_PROMPT, tokens))
                # A unique first token per engine and round defeats every prefix cache: full prompt cost.
                results[name]["pp"].append(engine.complete(f"[{r}:{name}] {incidents[r]}", 1))
            console.print(f"round {r + 1}/{rounds} done")
    same = {s.text for n in engines for s in results[n]["gen"]}
    report_overhead(results, threads, len(same) == 1)


def _ratio(
    results: dict[str, dict[str, list[Sample]]], name: str, kind: str, value: Callable[[Sample], float]
) -> float:
    pairs = zip(results[name][kind], results["direct"][kind], strict=True)
    return statistics.median(value(a) / value(b) for a, b in pairs)


def report_overhead(results: dict[str, dict[str, list[Sample]]], threads: int, same_tokens: bool) -> None:
    table = Table(title=f"serving overhead, SmolLM2-135M Q4_1, {threads} thread(s), medians")
    table.add_column("measure")
    for name in results:
        table.add_column(name, justify="right")
    table.add_column("immune-edge / direct", justify="right")
    table.add_column("llama_cpp.server / direct", justify="right")

    def row(label: str, kind: str, value: Callable[[Sample], float], fmt: str) -> None:
        medians = [fmt.format(statistics.median(value(s) for s in results[n][kind])) for n in results]
        ours = _ratio(results, "immune-edge", kind, value)
        theirs = _ratio(results, "llama_cpp.server", kind, value)
        table.add_row(label, *medians, f"{ours:.3f}x", f"{theirs:.3f}x")

    row("tokens/s, non-streaming (end to end)", "gen", lambda s: s.rate, "{:.1f}")
    row("tokens/s, streaming (after 1st token)", "stream", lambda s: s.decode_rate, "{:.1f}")
    row("time to first token, streaming (ms)", "stream", lambda s: s.ttft * 1000, "{:.0f}")
    row("prompt tokens/s (~2.8k-token Slips prompt)", "pp", lambda s: s.prompt_tokens / s.seconds, "{:.0f}")
    console.print(table)
    ttft = [
        (a.ttft - b.ttft) * 1000
        for a, b in zip(results["immune-edge"]["stream"], results["direct"]["stream"], strict=True)
    ]
    console.print(f"TTFT overhead of immune-edge over direct: median {statistics.median(ttft):.1f} ms")
    console.print(f"all engines generated identical text: {'yes' if same_tokens else 'NO'}")


def prefix_reuse(count: int, threads: int) -> None:
    """TTFT of alert summaries with and without prefix reuse, and of an identical retry."""
    model = str(smollm2_gguf())
    texts = incident_texts(count)
    rows: list[tuple[str, list[tuple[float, int]], float, float]] = []
    for reuse in ("off", "previous prompt", "+ RAM cache"):
        port = free_port()
        command = [sys.executable, "-m", "edge.cli", "serve", "--model", model, "--port", str(port)]
        command += ["--threads", str(threads), "--n-ctx", str(N_CTX), "--chat-format", "chatml"]
        command += ["--no-prefix-reuse" if reuse == "off" else "--prefix-reuse"]
        command += ["--prompt-cache-mb", "512" if reuse == "+ RAM cache" else "0"]
        base = f"http://127.0.0.1:{port}"
        with process(command, f"{base}/ready"), httpx.Client(base_url=base, timeout=600) as client:

            def ask(messages: list[dict[str, str]]) -> tuple[float, int]:
                started = time.perf_counter()
                body = {"messages": messages, "max_tokens": 1, "temperature": 0}
                data = client.post("/v1/chat/completions", json=body).raise_for_status().json()
                return time.perf_counter() - started, data["usage"]["prompt_tokens"]

            ask(summary_messages("warm-up"))
            distinct = [ask(summary_messages(text)) for text in texts]
            again = ask(summary_messages(texts[-1]))[0]  # Slips retrying the same alert at once
            earlier = ask(summary_messages(texts[0]))[0]  # an alert from a few requests back
        rows.append((reuse, distinct, again, earlier))
    prefix_tokens = _chat_tokens(model, summary_messages(""))
    report_prefix(rows, prefix_tokens)


def _chat_tokens(model: str, messages: list[dict[str, str]]) -> int:
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import format_chatml

    llm = Llama(model_path=model, vocab_only=True, verbose=False)
    return len(llm.tokenize(format_chatml(messages).prompt.encode(), special=True))


def report_prefix(rows: list[tuple[str, list[tuple[float, int]], float, float]], prefix_tokens: int) -> None:
    table = Table(title="Slips alert summaries: prompt time (max_tokens=1) by prefix reuse mode")
    for column in (
        "prefix reuse",
        "incidents",
        "prompt tokens",
        "TTFT (s)",
        "same alert again (s)",
        "earlier alert again (s)",
    ):
        table.add_column(column, justify="right")
    for mode, distinct, again, earlier in rows:
        ttft = statistics.median(t for t, _ in distinct)
        tokens = statistics.median(n for _, n in distinct)
        table.add_row(
            mode, str(len(distinct)), f"{tokens:.0f}", f"{ttft:.2f}", f"{again:.3f}", f"{earlier:.3f}"
        )
    console.print(table)
    off = statistics.median(t for t, _ in rows[0][1])
    tokens = statistics.median(n for _, n in rows[0][1])
    console.print(
        f"shared prefix (system prompt + instructions, {len(SYSTEM_PROMPT) + len(INSTRUCTIONS)} chars): "
        f"{prefix_tokens} tokens = {prefix_tokens / tokens:.1%} of the median prompt"
    )
    for mode, distinct, again, earlier in rows[1:]:
        ttft = statistics.median(t for t, _ in distinct)
        console.print(
            f"{mode}: distinct alerts {ttft / off:.3f}x the TTFT without reuse; same alert again "
            f"{again / rows[0][2]:.3f}x; earlier alert again {earlier / rows[0][3]:.3f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--incidents", type=int, default=6)
    parser.add_argument(
        "--prompt-cache-mb", type=int, default=0, help="immune-edge's RAM prompt cache in the overhead part"
    )
    parser.add_argument("--part", choices=("all", "overhead", "prefix"), default="all")
    args = parser.parse_args()
    if args.part in ("all", "overhead"):
        overhead(args.rounds, args.threads, args.tokens, args.prompt_cache_mb)
    if args.part in ("all", "prefix"):
        prefix_reuse(args.incidents, args.threads)


if __name__ == "__main__":
    main()
