"""Structured outputs enforced by a grammar in the worker, on the real SmolLM2-135M (which writes
broken JSON on its own): 20 Slips risk verdicts through OpenAI json_schema (the official client's
``parse``), OpenAI json_object and Ollama ``format`` (the official client), each answer parsed and
checked against the schema with jsonschema; schemas that cannot be enforced refused with a 400."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Literal

import httpx
import jsonschema
import ollama
import openai
import pytest
from pydantic import BaseModel, ConfigDict

from tests.harness.risk_prompts import ALERTS, ASK, SCHEMA
from tests.harness.serve import Server, serving

NAME = "slips-risk-smol"


class RiskVerdict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    risk_level: Literal["low", "medium", "high", "critical"]
    cause: str
    actions: list[str]


@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm2_model) -> Iterator[Server]:
    socket = tmp_path_factory.mktemp("structured") / "api.sock"
    options = ["--chat-format", "chatml", "--name", NAME, "--n-ctx", "1024", "--max-tokens-cap", "512"]
    with serving(smollm2_model, socket, *options) as running:
        yield running


def _messages(alert: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": ASK + alert}]


def _validates(text: str) -> bool:
    try:
        jsonschema.validate(json.loads(text), SCHEMA)
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False
    return True


def test_openai_json_schema_through_the_official_parse_helper(server) -> None:
    client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="unused", max_retries=0, timeout=120)
    for alert in ALERTS:
        completion = client.chat.completions.parse(
            model=NAME, messages=_messages(alert), response_format=RiskVerdict, temperature=0, max_tokens=256
        )
        choice = completion.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        assert isinstance(choice.message.parsed, RiskVerdict)
        assert _validates(choice.message.content), choice.message.content


def test_ollama_format_schema_through_the_official_client(server) -> None:
    client = ollama.Client(host=server.base, timeout=120)
    for alert in ALERTS:
        reply = client.chat(
            model=NAME,
            messages=_messages(alert),
            format=SCHEMA,
            options={"temperature": 0, "num_predict": 256},
        )
        assert reply.done_reason == "stop", reply.message.content
        assert _validates(reply.message.content), reply.message.content


def test_openai_json_object_answers_are_json_and_free_text_is_not(server) -> None:
    """json_object guarantees syntax, not the schema. An answer cut by max_tokens is a prefix of
    JSON, and says so with finish_reason "length"; every answer that finished parses. Without a
    format the same model, prompts and budget do not keep to the schema."""

    def ask(alert: str, **extra: object) -> tuple[str, str]:
        body = {"model": NAME, "messages": _messages(alert), "temperature": 0, "max_tokens": 256} | extra
        reply = httpx.post(f"{server.base}/v1/chat/completions", json=body, timeout=120).json()
        return reply["choices"][0]["message"]["content"], reply["choices"][0]["finish_reason"]

    finished = 0
    for alert in ALERTS:
        text, reason = ask(alert, response_format={"type": "json_object"})
        if reason == "stop":
            finished += 1
            assert isinstance(json.loads(text), dict), text
        else:
            assert reason == "length", reason
    assert finished >= len(ALERTS) // 2
    free = [ask(alert)[0] for alert in ALERTS[:5]]
    assert not all(_validates(text) for text in free)


UNENFORCEABLE = [
    ({"type": "integer", "minimum": 3}, "minimum at # cannot be enforced by the grammar"),
    ({"type": "string", "format": "email"}, "format 'email' at # cannot be enforced"),
    ({"$ref": "https://example.com/verdict.json"}, "only references inside the schema"),
    ({"type": "nope"}, "is not a valid JSON schema"),
    (
        {"type": "object", "properties": {"ip": {"type": "string", "pattern": "^[0-9.]+$", "maxLength": 15}}},
        "maxLength together with pattern at #/properties/ip is not enforced",
    ),
    ({"type": "object", "required": ["cause"], "properties": {}}, "required cause at # is not listed"),
    ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, "uniqueItems at #"),
]


@pytest.mark.parametrize(("schema", "needle"), UNENFORCEABLE)
def test_a_schema_the_grammar_cannot_enforce_is_refused(server, schema, needle: str) -> None:
    spec = {"name": "verdict", "schema": schema}
    body = {"messages": _messages(ALERTS[0]), "response_format": {"type": "json_schema", "json_schema": spec}}
    reply = httpx.post(f"{server.base}/v1/chat/completions", json=body, timeout=60)
    assert reply.status_code == 400 and needle in reply.json()["error"]["message"], reply.text
    body = {"model": NAME, "stream": False, "messages": _messages(ALERTS[0]), "format": schema}
    reply = httpx.post(f"{server.base}/api/chat", json=body, timeout=60)
    assert reply.status_code == 400 and needle in reply.json()["error"], reply.text


@pytest.mark.parametrize(
    ("response_format", "needle"),
    [
        ({"type": "json_schema", "schema": SCHEMA}, 'the schema goes in json_schema: {"name": ..., "schema"'),
        ({"type": "json_schema"}, 'type "json_schema" needs json_schema'),
        ({"type": "json_schema", "json_schema": {"name": "v", **SCHEMA}}, "response_format.json_schema.type"),
        ({"type": "json_object", "json_schema": {"name": "v", "schema": SCHEMA}}, "only read with type"),
        ({"type": "yaml"}, "response_format.type"),
    ],
)
def test_a_schema_in_the_wrong_place_is_refused_not_ignored(server, response_format, needle: str) -> None:
    body = {"messages": _messages(ALERTS[0]), "response_format": response_format}
    reply = httpx.post(f"{server.base}/v1/chat/completions", json=body, timeout=60)
    assert reply.status_code == 400 and needle in reply.json()["error"]["message"], reply.text


def test_ollama_format_must_be_json_or_a_schema(server) -> None:
    body = {"model": NAME, "stream": False, "prompt": "hi", "format": "yaml"}
    reply = httpx.post(f"{server.base}/api/generate", json=body, timeout=60)
    assert reply.status_code == 400 and 'format must be "json" or a JSON schema' in reply.json()["error"]


def _restarts(base: str) -> float:
    lines = httpx.get(f"{base}/metrics", timeout=10).text.splitlines()
    (line,) = [line for line in lines if line.startswith("immune_edge_worker_restarts_total ")]
    return float(line.split()[-1])


@pytest.mark.parametrize(
    ("schema", "needle"),
    [
        # Valid JSON Schema, but the grammar made from it is empty: llama.cpp's parser refuses it, and
        # llama-cpp-python would have handed the sampler a null pointer (SIGSEGV).
        ({"enum": []}, "llama.cpp refused the grammar"),
        ({"type": "string", "pattern": "a+"}, 'Pattern must start with "^"'),
    ],
)
def test_a_grammar_the_worker_cannot_use_is_a_400_and_the_worker_lives(server, schema, needle: str) -> None:
    restarts = _restarts(server.base)
    spec = {"name": "verdict", "schema": schema}
    body = {"messages": _messages(ALERTS[0]), "response_format": {"type": "json_schema", "json_schema": spec}}
    reply = httpx.post(f"{server.base}/v1/chat/completions", json=body, timeout=60)
    assert reply.status_code == 400 and needle in reply.json()["error"]["message"], reply.text
    assert reply.json()["error"]["code"] == "json_schema_unusable"
    ok = httpx.post(f"{server.base}/v1/chat/completions", json={"messages": _messages("hi"), "max_tokens": 4})
    assert ok.status_code == 200 and _restarts(server.base) == restarts
