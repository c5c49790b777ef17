"""The Anthropic Messages API on `immune-edge serve` with the real SmolLM2 GGUF: the official
`anthropic` SDK (streaming and not, system prompt, stop sequences, token counting), the exact request
Slips' `anthropic` provider sends, and hostile bodies, each with its error in Anthropic's shape."""

from __future__ import annotations

import json
from collections.abc import Iterator

import anthropic
import httpx
import pytest

from tests.harness.serve import Server, serving

TOKEN = "anthropic-test-token-0123456789"
NAME = "slips-summary-smol"
ALERT = "Summarise: host 10.0.0.5 scanned 200 ports in 3 seconds, then connected to 10.0.0.9:4444."
SYSTEM = "You are a network security analyst. Be brief."
#: The SDK has no sampling arguments any more; what Slips sends is a body field.
GREEDY = {"extra_body": {"temperature": 0}}


@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm2_model) -> Iterator[Server]:
    socket = tmp_path_factory.mktemp("anthropic") / "api.sock"
    options = ["--chat-format", "chatml", "--name", NAME, "--n-ctx", "1024", "--max-tokens-cap", "128"]
    with serving(smollm2_model, socket, *options, token=TOKEN) as running:
        yield running


@pytest.fixture
def client(server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.base, api_key=TOKEN, max_retries=0, timeout=120)


def _healthy(server: Server) -> None:
    reply = httpx.post(
        f"{server.base}/v1/messages",
        headers={"x-api-key": TOKEN},
        json={"model": NAME, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]},
        timeout=120,
    )
    assert reply.status_code == 200, reply.text


def test_sdk_message_with_system_prompt_stop_sequence_and_token_count(client) -> None:
    messages = [{"role": "user", "content": ALERT}]
    message = client.messages.create(
        model=NAME, max_tokens=100, system=SYSTEM, messages=messages, stop_sequences=["."], **GREEDY
    )
    assert message.type == "message" and message.role == "assistant" and message.model == NAME
    assert message.id.startswith("msg_")
    (block,) = message.content
    assert block.type == "text" and block.text and "." not in block.text
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", ".")
    assert 0 < message.usage.output_tokens < 100
    # count_tokens applies the same template: exactly the tokens the message's prompt took.
    counted = client.messages.count_tokens(model=NAME, system=SYSTEM, messages=messages)
    assert counted.input_tokens == message.usage.input_tokens > 20

    cut = client.messages.create(model=NAME, max_tokens=3, messages=messages, **GREEDY)
    assert (cut.stop_reason, cut.stop_sequence, cut.usage.output_tokens) == ("max_tokens", None, 3)
    whole = client.messages.create(
        model=NAME, max_tokens=100, messages=[{"role": "user", "content": "Say hello."}], **GREEDY
    )
    assert whole.stop_reason == "end_turn" and whole.usage.output_tokens < 100


def test_sdk_streaming_gives_the_event_sequence_and_the_same_text(client, server) -> None:
    request = {
        "model": NAME,
        "max_tokens": 40,
        "system": [{"type": "text", "text": SYSTEM}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": ALERT}]}],
        **GREEDY,
    }
    with client.messages.stream(**request) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == final.content[0].text and streamed
    assert final.stop_reason in ("end_turn", "max_tokens") and final.usage.input_tokens > 20
    assert streamed == client.messages.create(**request).content[0].text  # greedy: same answer

    raw = {k: v for k, v in request.items() if k != "extra_body"} | GREEDY["extra_body"] | {"stream": True}
    with httpx.stream("POST", f"{server.base}/v1/messages", json=raw, headers={"x-api-key": TOKEN}) as reply:
        lines = [line for line in reply.iter_lines() if line]
    names = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    datas = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
    assert [d["type"] for d in datas] == names
    deltas = names.count("content_block_delta")
    expected = ["message_start", "content_block_start", "ping"] + ["content_block_delta"] * deltas
    assert names == [*expected, "content_block_stop", "message_delta", "message_stop"] and deltas > 0
    assert datas[0]["message"]["usage"]["input_tokens"] == final.usage.input_tokens
    assert datas[-2]["usage"]["output_tokens"] == final.usage.output_tokens
    assert {d["delta"]["type"] for d in datas if d["type"] == "content_block_delta"} == {"text_delta"}


def test_the_request_slips_anthropic_provider_sends(server) -> None:
    """What Slips' LLM module sends with provider `anthropic`: x-api-key and anthropic-version headers,
    JSON body with model, messages, max_tokens, system and temperature; it reads the text blocks and
    the two usage counts."""
    reply = httpx.post(
        f"{server.base}/v1/messages",
        headers={
            "x-api-key": TOKEN,
            "anthropic-version": "2023-06-01",
            "Content-Type": "application/json",
        },
        content=json.dumps(
            {
                "model": NAME,
                "messages": [{"role": "user", "content": ALERT}],
                "max_tokens": 64,
                "system": SYSTEM,
                "temperature": 0.2,
            }
        ),
        timeout=120,
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    text = "".join(block["text"] for block in body["content"] if block["type"] == "text")
    assert text.strip()
    assert body["usage"]["input_tokens"] > 0 and body["usage"]["output_tokens"] > 0


HOSTILE = [
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}]}, 400, "max_tokens: Field required"),
    (
        {"model": NAME, "max_tokens": "64", "messages": [{"role": "user", "content": "hi"}]},
        400,
        "max_tokens: Input should be a valid integer",
    ),
    ({"model": NAME, "max_tokens": 8, "messages": "hi"}, 400, "messages: Input should be a valid array"),
    (
        {"model": "claude-3-opus", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]},
        404,
        "model 'claude-3-opus' is not served here",
    ),
    (
        {
            "model": NAME,
            "max_tokens": 8,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is in this picture?"},
                        {
                            "type": "image",
                            "source": {"type": "base64", "media_type": "image/png", "data": "AA=="},
                        },
                    ],
                }
            ],
        },
        400,
        "content block 1 is of type 'image': this server takes text blocks only",
    ),
    (
        {
            "model": NAME,
            "max_tokens": 8,
            "tools": [{"name": "x"}],
            "messages": [{"role": "user", "content": "hi"}],
        },
        400,
        "tools: not supported by this server",
    ),
    (
        {
            "model": NAME,
            "max_tokens": 8,
            "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello"}],
        },
        400,
        "assistant prefill is not supported",
    ),
    ({"model": NAME, "max_tokens": 0, "messages": [{"role": "user", "content": "hi"}]}, 400, "max_tokens"),
    (
        {"model": NAME, "max_tokens": 8, "temperature": 1.5, "messages": [{"role": "user", "content": "hi"}]},
        400,
        "temperature: Input should be less than or equal to 1",
    ),
]


@pytest.mark.parametrize(("body", "status", "needle"), HOSTILE)
def test_hostile_bodies_get_anthropic_errors_and_the_server_stays_healthy(
    server, body, status: int, needle: str
) -> None:
    reply = httpx.post(f"{server.base}/v1/messages", headers={"x-api-key": TOKEN}, json=body, timeout=60)
    assert reply.status_code == status, reply.text
    error = reply.json()
    expected_type = "not_found_error" if status == 404 else "invalid_request_error"
    assert error["type"] == "error" and error["error"]["type"] == expected_type
    assert needle in error["error"]["message"], error
    _healthy(server)


def test_huge_body_wrong_key_and_sdk_errors(server, client) -> None:
    huge = (
        b'{"model": "x", "max_tokens": 8, "messages": [{"role": "user", "content": "'
        + b"a" * (2 << 20)
        + b'"}]}'
    )
    reply = httpx.post(f"{server.base}/v1/messages", headers={"x-api-key": TOKEN}, content=huge, timeout=60)
    assert reply.status_code == 413
    assert reply.json()["error"]["type"] == "request_too_large"
    wrong = httpx.post(f"{server.base}/v1/messages", headers={"x-api-key": "nope"}, json={}, timeout=60)
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.NotFoundError, match="not served here"):
        client.messages.create(model="claude-x", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=server.base, api_key="wrong-key", max_retries=0).messages.create(
            model=NAME, max_tokens=8, messages=[{"role": "user", "content": "hi"}]
        )
    _healthy(server)
