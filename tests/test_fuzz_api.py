"""Every HTTP endpoint of the device's API fuzzed from the OpenAPI document it serves, with
schemathesis, against a real `immune-edge serve` of Gemma-3-270M: a valid request (its model the
served one, its token limits within the device's cap) is answered with success, an invalid one with
a 4xx naming the problem; no server error except the documented 503/504, no internal text in an
error body, and the server still ready after every call. Examples per operation are fixed
(``EXAMPLES``), so the run takes a minute or two."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from edge.api.app import create_app
from edge.api.generation import Serving
from edge.audit import Audit
from edge.metrics import Metrics
from edge.runtime.router import ModelRouter
from tests.harness.error_bodies import INTERNAL_TEXT
from tests.harness.serve import Server, serving

#: Examples per API operation (recorded in docs/benchmarks.md).
EXAMPLES = 15
#: The only server errors the API documents: busy or deferred (503) and over its time limit (504).
DOCUMENTED_5XX = {503, 504}


@pytest.fixture(scope="module")
def api(tmp_path_factory, gemma3_model) -> Iterator[Server]:
    socket = tmp_path_factory.mktemp("fuzz-api") / "s.sock"
    # A small token cap keeps each fuzzed generation short; the cap itself is fuzzed too (400 above it).
    with serving(gemma3_model, socket, "--name", "gemma", "--max-tokens-cap", str(CAP)) as server:
        yield server


def _operations(schema: schemathesis.BaseSchema) -> dict[str, Any]:
    return {op.label: op for op in (result.ok() for result in schema.get_all_operations())}


#: The operations, known when tests are collected (the app's document built in-process); each test
#: fuzzes the document the running server publishes, which must hold the same operations.
OPERATIONS = _operations(
    schemathesis.openapi.from_dict(create_app(Serving(ModelRouter(), Metrics()), Audit()).openapi())
)


@pytest.fixture(scope="module")
def served_operations(api: Server) -> dict[str, Any]:
    document = httpx.get(f"{api.base}/openapi.json", timeout=30)
    assert document.status_code == 200 and document.headers["content-type"].startswith("application/json")
    served = _operations(schemathesis.openapi.from_dict(document.json()))
    assert sorted(served) == sorted(OPERATIONS)
    return served


#: Token limits a valid request may carry: the server's --max-tokens-cap.
CAP = 8
_LIMITS = ("max_tokens", "max_completion_tokens", "num_predict")


def _served_and_within_cap(body: object) -> None:
    """Make a schema-valid body also valid for this server: its model, token limits within the cap,
    no output schema, a user turn last (rules the schema cannot state; their refusals have the API's
    own tests)."""
    if not isinstance(body, dict):
        return
    # JSON Schema counts 1.0 as an integer; the API's models are strict and want 1 (the 400 names
    # the field), as a JSON client writing integers sends them.
    for key, value in body.items():
        if isinstance(value, float) and value.is_integer():
            body[key] = int(value)
    body["model"] = "gemma"  # every request body of this API names its model (optional: the default)
    if "name" in body:  # /api/show's older spelling of it
        body["name"] = "gemma"
    # An arbitrary JSON Schema may be one the grammar cannot enforce (a 400 by design, tested in
    # test_api_structured.py), so valid requests ask for plain text.
    for key in ("format", "response_format"):
        body.pop(key, None)
    for key in _LIMITS:
        if isinstance(body.get(key), int):
            body[key] = max(1, min(body[key], CAP))
    messages = body.get("messages")
    if isinstance(messages, list) and (not messages or (messages[-1] or {}).get("role") != "user"):
        messages.append({"role": "user", "content": "Hi"})  # Anthropic's API has no assistant prefill here
    options = body.get("options")
    if isinstance(options, dict):
        for key, value in options.items():
            if isinstance(value, float) and value.is_integer():
                options[key] = int(value)
        if isinstance(options.get("num_predict"), int):
            options["num_predict"] = max(1, min(options["num_predict"], CAP))
        options.pop("num_ctx", None)  # a context above the loaded one is a 400 by design


#: Valid requests for every operation; requests that break the schema where there is one to break
#: (a body: the GET endpoints take no parameters).
CASES = [(label, GenerationMode.POSITIVE) for label in sorted(OPERATIONS)] + [
    (label, GenerationMode.NEGATIVE) for label in sorted(OPERATIONS) if label.startswith("POST ")
]


@pytest.mark.parametrize(("label", "mode"), CASES)
def test_every_endpoint_survives_fuzzing(
    label: str, mode: GenerationMode, api: Server, served_operations: dict[str, Any]
) -> None:
    valid = mode is GenerationMode.POSITIVE

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(case=served_operations[label].as_strategy(mode))
    def call(case: schemathesis.Case) -> None:
        if valid:
            _served_and_within_cap(case.body)
        response = case.call(base_url=api.base, timeout=120)
        status = response.status_code
        shown = f"{label}: {status} {response.text[:500]} for {str(case.body)[:300]}"
        assert status < 500 or status in DOCUMENTED_5XX, shown
        if valid:  # a valid request succeeds (or waits its turn: busy is documented)
            assert status < 400 or status in DOCUMENTED_5XX, shown
        else:
            assert status >= 400, shown  # a body that breaks the schema is never taken
        if status >= 400:
            assert not INTERNAL_TEXT.search(response.text), response.text[:500]
        assert httpx.get(f"{api.base}/ready", timeout=30).status_code == 200

    call()
