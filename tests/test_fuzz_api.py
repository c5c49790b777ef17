"""Every HTTP endpoint of the device's API fuzzed from its own OpenAPI document with schemathesis,
against a real `immune-edge serve` of Gemma-3-270M: no server error except the documented 503/504,
no internal text in an error body, and the server still ready after every call. Examples per
operation are fixed (``EXAMPLES``), so the run takes a minute or two."""

from __future__ import annotations

from collections.abc import Iterator

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
    with serving(gemma3_model, socket, "--name", "gemma", "--max-tokens-cap", "8") as server:
        yield server


def _schema() -> schemathesis.BaseSchema:
    """The OpenAPI document the server publishes at /openapi.json, built in-process so the
    operations are known when tests are collected."""
    app = create_app(Serving(ModelRouter(), Metrics()), Audit())
    return schemathesis.openapi.from_dict(app.openapi())


SCHEMA = _schema()
OPERATIONS = {op.label: op for op in (result.ok() for result in SCHEMA.get_all_operations())}


#: Valid requests for every operation; requests that break the schema where there is one to break
#: (a body: the GET endpoints take no parameters).
CASES = [(label, GenerationMode.POSITIVE) for label in sorted(OPERATIONS)] + [
    (label, GenerationMode.NEGATIVE) for label in sorted(OPERATIONS) if label.startswith("POST ")
]


@pytest.mark.parametrize(("label", "mode"), CASES)
def test_every_endpoint_survives_fuzzing(label: str, mode: GenerationMode, api: Server) -> None:

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(case=OPERATIONS[label].as_strategy(mode))
    def call(case: schemathesis.Case) -> None:
        response = case.call(base_url=api.base, timeout=120)
        status = response.status_code
        assert status < 500 or status in DOCUMENTED_5XX, f"{label}: {status} {response.text[:500]}"
        if status >= 400:
            assert not INTERNAL_TEXT.search(response.text), response.text[:500]
        assert httpx.get(f"{api.base}/ready", timeout=30).status_code == 200

    call()
