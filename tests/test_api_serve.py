"""`immune-edge serve` on the real SmolLM2 GGUF, driven by the official openai and ollama clients
over TCP and over the Unix socket, plus hostile HTTP input."""

from __future__ import annotations

import json
import re
import stat
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import ollama
import openai
import psutil
import pytest

from tests.harness.serve import Server, serving
from tests.harness.waiting import wait_until

PROMPT = [{"role": "user", "content": "Summarise: host 10.0.0.5 scanned 200 ports in 3 seconds."}]


@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm2_model) -> Iterator[Server]:
    socket = tmp_path_factory.mktemp("sock") / "immune-edge.sock"
    options = ["--chat-format", "chatml", "--name", "slips-summary-smol", "--alias", "slips-fast"]
    options += ["--max-tokens-cap", "64", "--n-ctx", "512", "--queue", "2"]
    with serving(smollm2_model, socket, *options) as running:
        yield running


def _prompt_cache_bytes(base: str) -> float | None:
    for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines():
        if line.startswith("immune_edge_prompt_cache_bytes "):
            return float(line.split()[-1])
    return None


def test_serve_prompt_cache_reaches_the_worker(tmp_path, smollm2_model, server) -> None:
    """Bug: `serve --prompt-cache-mb` never reached the worker. The figure is what the worker
    reports of the cache it set up when the model loaded."""
    assert _prompt_cache_bytes(server.base) == 0.0
    with serving(smollm2_model, tmp_path / "c.sock", "--prompt-cache-mb", "64", "--n-ctx", "512") as cached:
        assert _prompt_cache_bytes(cached.base) == 64 * 1024 * 1024
        reply = httpx.post(
            f"{cached.base}/v1/completions",
            json={"model": smollm2_model.stem, "prompt": "Slips saw", "max_tokens": 2},
            timeout=60,
        )
        assert reply.status_code == 200


def test_openai_client_over_tcp(server) -> None:
    client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="unused")
    reply = client.chat.completions.create(
        model="slips-summary-smol", messages=PROMPT, max_tokens=16, temperature=0
    )
    assert reply.choices[0].message.content
    assert reply.usage.completion_tokens > 0 and reply.usage.prompt_tokens > 0
    pieces = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model="slips-fast", messages=PROMPT, max_tokens=16, temperature=0, stream=True
        )
    ]
    assert "".join(pieces) == reply.choices[0].message.content  # greedy: the same text either way
    assert [m.id for m in client.models.list()] == ["slips-summary-smol", "slips-fast"]
    completion = client.completions.create(model="slips-fast", prompt="The port scan", max_tokens=8)
    assert completion.choices[0].text


def test_openai_client_over_unix_socket(server) -> None:
    client = openai.OpenAI(base_url="http://localhost/v1", api_key="unused", http_client=server.uds())
    reply = client.chat.completions.create(model="slips-fast", messages=PROMPT, max_tokens=8)
    assert reply.choices[0].message.content
    assert stat.S_IMODE(server.socket.stat().st_mode) == 0o660  # `serve --socket`: the same default mode


def test_ollama_client_over_tcp_and_unix_socket(server) -> None:
    for client in (
        ollama.Client(host=server.base),
        ollama.Client(host="http://localhost", transport=httpx.HTTPTransport(uds=str(server.socket))),
    ):
        reply = client.chat(
            model="slips-summary-smol",
            messages=PROMPT,
            stream=False,
            options={"temperature": 0, "num_predict": 16},
        )
        assert reply.message.content and reply.eval_count and reply.prompt_eval_count
        streamed = "".join(
            part.message.content
            for part in client.chat(
                model="slips-summary-smol",
                messages=PROMPT,
                options={"temperature": 0, "num_predict": 16},
                stream=True,
            )
        )
        assert streamed == reply.message.content
        generated = client.generate(model="slips-fast", prompt="Port scans are", options={"num_predict": 8})
        assert generated.response
        assert [m.model for m in client.list().models] == ["slips-summary-smol", "slips-fast"]


def test_slips_style_request_without_a_client_library(server) -> None:
    """What Slips' urllib3 code sends for provider 'ollama': non-streaming /api/chat."""
    body = {
        "model": "slips-fast",
        "messages": PROMPT,
        "stream": False,
        "options": {"temperature": 0.2, "num_predict": 32},
    }
    reply = httpx.post(f"{server.base}/api/chat", json=body, timeout=120).json()
    assert reply["message"]["content"] and reply["prompt_eval_count"] > 0 and reply["eval_count"] > 0


def test_ollama_as_its_documentation_calls_it(server, smollm2_model) -> None:
    """curl -d with no Content-Type, keep_alive, the common options (num_ctx up to the model's
    context, repeat_penalty, seed, stop) and /api/show, as Ollama answers them."""
    body = {
        "model": "slips-summary-smol",
        "messages": PROMPT,
        "stream": False,
        "keep_alive": "5m",
        "options": {"num_ctx": 512, "num_predict": 8, "repeat_penalty": 1.3, "seed": 7, "stop": ["\n"]},
    }
    reply = httpx.post(f"{server.base}/api/chat", content=json.dumps(body), timeout=120)
    assert reply.request.headers.get("content-type") is None
    assert reply.status_code == 200 and "\n" not in reply.json()["message"]["content"], reply.text
    generate = {"model": "slips-fast", "prompt": "Port scans are", "stream": False, "keep_alive": 0}
    reply = httpx.post(f"{server.base}/api/generate", content=json.dumps(generate), timeout=120)
    assert reply.status_code == 200 and reply.json()["response"], reply.text
    too_long = body | {"options": {"num_ctx": 8192}}
    reply = httpx.post(f"{server.base}/api/chat", content=json.dumps(too_long), timeout=120)
    assert reply.status_code == 400
    assert reply.json() == {"error": "num_ctx 8192 exceeds this model's context of 512 tokens"}

    shown = httpx.post(f"{server.base}/api/show", content=b'{"model": "slips-fast"}', timeout=30).json()
    assert shown["details"]["family"] == "llama" and shown["details"]["parameter_size"] == "135M"
    assert shown["model_info"]["llama.context_length"] == 512 and shown["template"] == "chatml"
    assert shown["capabilities"] == ["completion"]
    assert ollama.Client(host=server.base).show("slips-summary-smol").details.family == "llama"
    missing = httpx.post(f"{server.base}/api/show", json={"model": "llama3"}, timeout=30)
    assert missing.status_code == 404 and "not served here" in missing.json()["error"]
    tags = httpx.get(f"{server.base}/api/tags", timeout=30).json()["models"]
    assert tags[0]["size"] == smollm2_model.stat().st_size and tags[0]["details"]["format"] == "gguf"


@pytest.mark.parametrize(
    ("path", "payload", "status", "needle"),
    [
        ("/v1/chat/completions", b"{not json", 400, "invalid JSON"),
        ("/v1/chat/completions", b'{"messages": "hi"}', 400, "messages"),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": "5"}',
            400,
            "max_tokens",
        ),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}',
            400,
            "exceeds this model's cap of 64",
        ),
        (
            "/v1/chat/completions",
            b'{"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}',
            404,
            "not served here",
        ),
        (
            "/api/chat",
            b'{"model": "nope", "messages": [{"role": "user", "content": "x"}]}',
            404,
            "not served",
        ),
        ("/api/chat", b"[1, 2]", 400, "JSON object"),
    ],
)
def test_hostile_bodies_get_clear_errors(server, path: str, payload: bytes, status: int, needle: str) -> None:
    response = httpx.post(
        f"{server.base}{path}", content=payload, headers={"content-type": "application/json"}, timeout=30
    )
    assert response.status_code == status, response.text
    assert needle in response.text
    if path.startswith("/v1"):
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_huge_body_and_long_prompt(server) -> None:
    huge = b'{"messages": [{"role": "user", "content": "' + b"a" * (2 * 1024 * 1024) + b'"}]}'
    response = httpx.post(
        f"{server.base}/v1/chat/completions",
        content=huge,
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 413 and "exceeds" in response.text
    refused = 'immune_edge_context_refusals_total{model="slips-summary-smol"}'
    before = _metric(server.base, refused)
    long_prompt = {"messages": [{"role": "user", "content": "port scan " * 800}], "max_tokens": 8}
    response = httpx.post(f"{server.base}/v1/chat/completions", json=long_prompt, timeout=120)
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    # Both numbers, as llama-server gives them: the prompt's real size and the model's context.
    prompt_tokens = int(re.search(r"the prompt is (\d+) tokens", message)[1])  # type: ignore[index]
    assert prompt_tokens > 512 and "context of 512 tokens" in message, message
    assert response.json()["error"]["code"] == "context_length_exceeded"
    assert _metric(server.base, refused) == before + 1  # counted per model, for the operator
    assert httpx.get(f"{server.base}/ready").status_code == 200


def test_client_prompt_versions_are_counted_per_model(server) -> None:
    counted = (
        'immune_edge_prompt_version_requests_total{model="slips-summary-smol",version="alert-summary-v2"}'
    )
    before = _metric(server.base, counted)
    prompt = "Summarise host 10.0.0.5.\n\nOUTPUT RULES:\n- One paragraph.\n- Prompt version: alert-summary-v2"
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 4}
    assert httpx.post(f"{server.base}/v1/chat/completions", json=body, timeout=120).status_code == 200
    assert _metric(server.base, counted) == before + 1
    # A line that is not a short version name is not counted, so clients cannot grow the label set.
    junk = {"messages": [{"role": "user", "content": "- Prompt version: " + "x y " * 50}], "max_tokens": 2}
    assert httpx.post(f"{server.base}/v1/chat/completions", json=junk, timeout=120).status_code == 200
    versions = [
        line
        for line in httpx.get(f"{server.base}/metrics", timeout=10).text.splitlines()
        if line.startswith("immune_edge_prompt_version_requests_total{")
    ]
    assert [line.rsplit(" ", 1)[0] for line in versions] == [counted], versions


def test_more_connections_than_the_queue_get_429_and_the_server_recovers(server) -> None:
    body = {"messages": PROMPT, "max_tokens": 32}

    def call(_: int) -> int:
        return httpx.post(f"{server.base}/v1/chat/completions", json=body, timeout=300).status_code

    with ThreadPoolExecutor(max_workers=100) as pool:
        statuses = list(pool.map(call, range(100)))
    assert set(statuses) <= {200, 429}
    assert statuses.count(429) > 0 and statuses.count(200) >= 1
    assert call(0) == 200


def _metric(base: str, name: str) -> float:
    """The sum of a metric's samples whose line starts with ``name`` (0 when absent)."""
    lines = httpx.get(f"{base}/metrics", timeout=10).text.splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.startswith(name))


def _ended(endpoint: str, status: str) -> str:
    return f'immune_edge_requests_total{{endpoint="{endpoint}",status="{status}"}}'


def _idle_after(base: str, endpoint: str, status: str, before: float) -> None:
    """Wait until one more request (than ``before``) ended with ``status`` and nothing runs or
    waits any more. The count is relative: the module's server carries earlier tests' requests."""
    ended = _ended(endpoint, status)
    wait_until(lambda: _metric(base, ended) == before + 1, 60, f"a {status} on {endpoint} in /metrics")
    wait_until(lambda: _metric(base, "immune_edge_queue_depth") == 0, 60, "the worker idle")


#: A base model counting on and on: far more tokens than any of these tests waits for.
COUNTING = {"model": "gemma", "prompt": "1, 2, 3, 4, 5, 6,", "max_tokens": 2000, "temperature": 0}


@pytest.fixture(scope="module")
def gemma_server(tmp_path_factory, gemma3_model) -> Iterator[Server]:
    socket = tmp_path_factory.mktemp("gemma") / "s.sock"
    with serving(gemma3_model, socket, "--name", "gemma", "--max-tokens-cap", "2000") as running:
        yield running


def test_a_hang_up_cancels_a_non_streaming_generation(gemma_server) -> None:
    """Bug: a client that hung up on a non-streaming request (Slips' kind) left its generation
    running to max_tokens, counted as a 200, while every request behind it waited."""
    base = gemma_server.base
    before = _metric(base, "immune_edge_completion_tokens_total")
    completed = _metric(base, _ended("/v1/completions", "200"))
    hung_up = _metric(base, _ended("/v1/completions", "499"))
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base}/v1/completions", json=COUNTING, timeout=httpx.Timeout(30, read=2))
    _idle_after(base, "/v1/completions", "499", hung_up)
    assert _metric(base, _ended("/v1/completions", "200")) == completed
    assert _metric(base, "immune_edge_completion_tokens_total") == before  # no result was produced
    ollama = {"model": "gemma", "prompt": COUNTING["prompt"], "raw": True, "stream": False}
    hung_up = _metric(base, _ended("/api/generate", "499"))
    with pytest.raises(httpx.ReadTimeout):
        options = {"num_predict": 2000, "temperature": 0}
        httpx.post(
            f"{base}/api/generate", json=ollama | {"options": options}, timeout=httpx.Timeout(30, read=2)
        )
    _idle_after(base, "/api/generate", "499", hung_up)


def test_a_hang_up_cancels_a_streaming_generation(gemma_server) -> None:
    base = gemma_server.base
    hung_up = _metric(base, _ended("/v1/completions", "499"))
    with httpx.stream(
        "POST", f"{base}/v1/completions", json=COUNTING | {"stream": True}, timeout=60
    ) as reply:
        lines = reply.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))  # the first token arrived
    _idle_after(base, "/v1/completions", "499", hung_up)


def test_a_worker_failure_tells_the_client_little_and_logs_the_cause_under_the_request_id(
    tmp_path, gemma3_model
) -> None:
    """Bug: the 503 of a failed worker carried the internal failure text verbatim to the client."""
    options = ("--name", "gemma", "--max-tokens-cap", "2000")
    with serving(gemma3_model, tmp_path / "s.sock", *options) as server, ThreadPoolExecutor(1) as pool:
        first_tokens = _metric(server.base, "immune_edge_time_to_first_token_seconds_count")
        pending = pool.submit(httpx.post, f"{server.base}/v1/completions", json=COUNTING, timeout=120)
        # Its first token is out, so the request cannot be retried on a new worker.
        wait_until(
            lambda: _metric(server.base, "immune_edge_time_to_first_token_seconds_count") > first_tokens,
            60,
            "the first token",
        )
        children = psutil.Process(server.process.pid).children()
        worker = next(p for p in children if "spawn_main" in " ".join(p.cmdline()))
        worker.kill()
        reply = pending.result()
    assert reply.status_code == 503, reply.text
    error = reply.json()["error"]
    assert error == {
        "message": "the model worker failed while answering; retry the request",
        "type": "server_error",
        "param": None,
        "code": "worker_failed",
    }
    ident = reply.headers["x-request-id"]
    log = server.process.stderr.read().decode()
    cause = next(line for line in log.splitlines() if f"request {ident} failed" in line)
    assert "worker_failed" in cause and "worker gemma" in cause, cause


def test_request_timeout_cancels_and_the_server_stays_healthy(tmp_path, gemma3_model) -> None:
    with serving(gemma3_model, tmp_path / "s.sock", "--request-timeout", "1", "--name", "gemma") as server:
        response = httpx.post(
            f"{server.base}/v1/completions", json=COUNTING | {"max_tokens": 1000}, timeout=60
        )
        assert response.status_code == 504, response.text
        assert response.json()["error"]["code"] == "timeout"
        # The generation was cancelled, not left running: the worker is idle and produced no result.
        wait_until(lambda: _metric(server.base, "immune_edge_queue_depth") == 0, 60, "the worker idle")
        assert _metric(server.base, "immune_edge_completion_tokens_total") == 0
        quick = httpx.post(f"{server.base}/v1/completions", json=COUNTING | {"max_tokens": 4}, timeout=60)
        assert quick.status_code == 200 and quick.json()["choices"][0]["text"]


def test_ollama_generate_streams_ndjson_with_raw_system_and_durations(server) -> None:
    url = f"{server.base}/api/generate"
    body = {
        "model": "slips-summary-smol",
        "prompt": "Name a colour.",
        "options": {"num_predict": 6, "temperature": 0},
    }
    with httpx.stream("POST", url, json=body, timeout=60) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in reply.iter_lines() if line]
    assert len(lines) >= 2 and all(line["done"] is False for line in lines[:-1])
    final = lines[-1]
    assert final["done"] is True and final["model"] == "slips-summary-smol"
    assert "".join(line["response"] for line in lines[:-1]).strip()
    assert final["done_reason"] in ("stop", "length") and 1 <= final["eval_count"] <= 6
    assert final["total_duration"] >= final["prompt_eval_duration"] > 0 and final["eval_duration"] > 0

    def prompt_tokens(**extra: object) -> int:
        options = {"num_predict": 1, "temperature": 0}
        answer = httpx.post(url, json=body | {"stream": False, "options": options} | extra, timeout=60)
        assert answer.status_code == 200, answer.text
        assert answer.json()["done_reason"] == "length"  # stopped by num_predict, said so
        return int(answer.json()["prompt_eval_count"])

    templated = prompt_tokens()
    assert prompt_tokens(raw=True) < templated  # raw: the prompt goes to the model as it is
    assert prompt_tokens(system="You are a terse SOC analyst. Answer in one word.") > templated


def test_ollama_ps_and_version(server) -> None:
    loaded = httpx.get(f"{server.base}/api/ps", timeout=10).json()["models"]
    assert {m["name"] for m in loaded} == {"slips-summary-smol", "slips-fast"}
    version = httpx.get(f"{server.base}/api/version", timeout=10).json()["version"]
    assert [int(part) for part in version.split(".")] >= [0, 1]


def test_a_full_queue_answers_429_with_retry_after(tmp_path, gemma3_model) -> None:
    """`--queue 0`: no request waits behind the running one; the next is told to come back."""
    options = ("--name", "gemma", "--max-tokens-cap", "2000", "--queue", "0")
    with serving(gemma3_model, tmp_path / "s.sock", *options) as server, ThreadPoolExecutor(1) as pool:
        hung_up = _metric(server.base, _ended("/v1/completions", "499"))
        running = pool.submit(
            httpx.post, f"{server.base}/v1/completions", json=COUNTING, timeout=httpx.Timeout(30, read=10)
        )
        wait_until(lambda: _metric(server.base, "immune_edge_queue_depth") == 1, 60, "the generation running")
        chat = {"model": "gemma", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        busy = httpx.post(f"{server.base}/v1/chat/completions", json=chat, timeout=30)
        assert busy.status_code == 429, busy.text
        assert int(busy.headers["retry-after"]) >= 1
        assert busy.json()["error"]["code"] == "queue_full"
        assert _metric(server.base, _ended("/v1/chat/completions", "429")) == 1
        with pytest.raises(httpx.ReadTimeout):
            running.result()  # hang up on the long one: the queue frees
        _idle_after(server.base, "/v1/completions", "499", hung_up)
        assert httpx.post(f"{server.base}/v1/chat/completions", json=chat, timeout=60).status_code == 200


@pytest.mark.parametrize("option", [{"top_k": 1}, {"top_p": 1e-6}])
def test_ollama_top_k_and_top_p_reach_the_sampler(gemma_server, option) -> None:
    """Hot sampling cut to the single likeliest token (top_k 1, or a tiny top_p) answers as greedy
    decoding does, whatever the seed: the options are applied, not ignored."""
    url = f"{gemma_server.base}/api/generate"
    body = {"model": "gemma", "prompt": "The colour of the sky is", "raw": True, "stream": False}
    greedy = httpx.post(url, json=body | {"options": {"temperature": 0, "num_predict": 12}}, timeout=120)
    answers = {
        httpx.post(
            url,
            json=body | {"options": {"temperature": 2.0, "seed": seed, "num_predict": 12, **option}},
            timeout=120,
        ).json()["response"]
        for seed in (1, 2, 3)
    }
    assert answers == {greedy.json()["response"]}
    # Without the cut, the same hot sampling wanders (the check above is not vacuous).
    hot = {
        httpx.post(
            url, json=body | {"options": {"temperature": 2.0, "seed": seed, "num_predict": 12}}, timeout=120
        ).json()["response"]
        for seed in (1, 2, 3)
    }
    assert hot != {greedy.json()["response"]}


def test_serve_listens_where_a_stock_slips_looks_by_default(tmp_path, gemma3_model) -> None:
    """No --port: loopback 11434, Ollama's address, which Slips' Ollama client uses unless told."""
    command = [sys.executable, "-m", "edge.cli", "serve", "--model", str(gemma3_model), "--name", "gemma"]
    process = subprocess.Popen(
        [*command, "--socket", str(tmp_path / "s.sock"), "--threads", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_until(lambda: _ready("http://127.0.0.1:11434") or process.poll() is not None, 120, "serve ready")
        assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
        tags = httpx.get("http://127.0.0.1:11434/api/tags", timeout=10).json()
        assert [m["name"] for m in tags["models"]] == ["gemma"]
    finally:
        process.terminate()
        process.wait(timeout=30)


def _ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
