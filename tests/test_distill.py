"""``immune-train distill`` against a real local teacher (``immune-edge serve`` with SmolLM2, which
speaks the OpenAI API): answers written, answers that break the contract left out, a resume after a
killed run, and a teacher that is down or answers garbage named clearly."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.harness.net import free_port
from tests.harness.serve import Server, serving
from tests.harness.training import immune_train
from trainer.dataset.records import ChatMessage, ChatRecord, read_records, write_records

SOURCE = "10.0.0.5"
MODEL = "SmolLM2-135M-Instruct.Q4_1"  # the name `immune-edge serve` gives the file
#: Reduction requests (one plain paragraph, no verdict) short enough for a 135M model to obey.
EASY = [
    f"In one short sentence of plain text, say that host {SOURCE} opened {n} connections to port 443."
    for n in (12, 40, 75, 130, 220, 310)
]


def _record(index: int, prompt: str, kind: str = "reduction", max_tokens: int = 60) -> ChatRecord:
    meta = {
        "source_ip": SOURCE,
        "incident_id": f"inc-{index}",
        "profile": "alert-summary-v2",
        "request": kind,
        "label": kind,
        "max_tokens": str(max_tokens),
        "temperature": "0.0",
        "estimated_tokens": str(len(prompt) // 4),
    }
    return ChatRecord(
        id=f"alert-summary-v2:inc-{index}:{kind}",
        group=f"inc-{index}",
        task="slips-summary",
        source="fixture",
        meta=meta,
        messages=[
            ChatMessage(role="user", content=prompt),
            ChatMessage(role="assistant", content="the offline answer"),
        ],
    )


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory, smollm2_model: Path) -> Iterator[Server]:
    socket = tmp_path_factory.mktemp("teacher") / "teacher.sock"
    with serving(smollm2_model, socket, "--n-ctx", "1024") as server:
        yield server


@pytest.fixture
def prepared(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    records = [_record(i, prompt) for i, prompt in enumerate(EASY)]
    # A final answer cut at 4 tokens cannot finish: the contract leaves it out.
    records.append(_record(99, f"Summarise the alert for {SOURCE}.", kind="final", max_tokens=4))
    write_records(data / "train.jsonl", records[:5])
    write_records(data / "eval.jsonl", records[5:])
    (data / "stats.json").write_text(json.dumps({"requests": {"profile": "alert-summary-v2"}}))
    return data


def _distill(data: Path, out: Path, url: str, *extra: str, check: bool = True):
    return immune_train(
        "distill", data, "--output", out, "--teacher", url, "--teacher-model", MODEL, *extra, check=check
    )


def test_distill_writes_contract_answers_and_leaves_out_the_rest(teacher, prepared, tmp_path) -> None:
    out = tmp_path / "distilled"
    result = _distill(prepared, out, f"{teacher.base}/v1", "--concurrency", "2")
    written = [*read_records(out / "train.jsonl"), *read_records(out / "eval.jsonl")]
    stats = json.loads((out / "stats.json").read_text())
    report = stats["distill"]
    assert stats["requests"] == {"profile": "alert-summary-v2"}  # the request fit travels along
    assert report["teacher_model"] == MODEL and report["teacher_url"].endswith("/v1/chat/completions")
    total_written = report["train"]["written"] + report["eval"]["written"]
    left_out = {**report["train"]["left_out"]}
    for reason, n in report["eval"]["left_out"].items():
        left_out[reason] = left_out.get(reason, 0) + n
    assert total_written == len(written) >= 1, result.stdout
    assert total_written + sum(left_out.values()) == 7
    # The cut final answer is named and never written.
    examples = dict(map(tuple, report["eval"]["examples"]))
    assert "within_budget" in examples["alert-summary-v2:inc-99:final"], examples
    assert "alert-summary-v2:inc-99:final" not in {r.id for r in written}
    for record in written:
        assert record.teacher == MODEL and record.answer != "the offline answer"
        assert "\n" not in record.answer.strip()  # the contract held for what was kept
    assert "left out alert-summary-v2:inc-99:final" in result.stderr


def test_a_killed_distill_resumes_where_it_stopped(teacher, prepared, tmp_path) -> None:
    out = tmp_path / "distilled"
    command = [
        sys.executable, "-m", "trainer.cli", "distill", str(prepared), "--output", str(out),
        "--teacher", teacher.base, "--teacher-model", MODEL, "--concurrency", "1",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    train = out / "train.jsonl"
    deadline = time.monotonic() + 300
    while not (train.is_file() and train.read_text().count("\n") >= 1):
        assert process.poll() is None, "distill ended before it could be interrupted"
        assert time.monotonic() < deadline, "no answer was written"
        time.sleep(0.05)
    process.kill()
    process.wait(timeout=30)
    with train.open("a") as handle:
        handle.write('{"id": "torn')  # what a crash in the middle of a line leaves
    kept_before = [json.loads(line)["id"] for line in train.read_text().splitlines()[:-1]]
    result = _distill(prepared, out, teacher.base)
    report = json.loads((out / "stats.json").read_text())["distill"]
    assert report["train"]["resumed"] == len(kept_before) >= 1, result.stdout
    ids = [r.id for r in read_records(train)]
    assert len(ids) == len(set(ids)), "an answer was written twice"
    assert set(kept_before) <= set(ids)
    assert report["train"]["written"] + sum(report["train"]["left_out"].values()) == 5 - len(kept_before)


class _Garbage(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        body = b"<html><body>teacher overloaded</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        pass


def test_a_teacher_that_is_down_or_answers_garbage_is_named(prepared, tmp_path) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    result = _distill(prepared, tmp_path / "a", down, check=False)
    assert result.returncode == 1 and "REJECTED (teacher-unreachable)" in result.stderr, result.stderr
    assert f"cannot reach the teacher at {down}/v1/chat/completions" in result.stderr
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Garbage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        result = _distill(prepared, tmp_path / "b", url, check=False)
    finally:
        server.shutdown()
    assert result.returncode == 1 and "REJECTED (no-teacher-answers)" in result.stderr, result.stderr
    assert "not an OpenAI chat completion" in result.stderr and "teacher overloaded" in result.stderr
    assert (tmp_path / "b" / "train.jsonl").read_text() == ""  # nothing unverified was written


def test_unrendered_records_and_an_unknown_model_are_refused(teacher, prepared, tmp_path) -> None:
    data = tmp_path / "plain"
    data.mkdir()
    plain = _record(1, "hello").model_copy(update={"meta": {"source_ip": SOURCE}})
    write_records(data / "train.jsonl", [plain])
    result = _distill(data, tmp_path / "out", teacher.base, check=False)
    assert result.returncode == 1 and "was not rendered by a prompt profile" in result.stderr
    result = immune_train(
        "distill", prepared, "--output", tmp_path / "o", "--teacher", teacher.base,
        "--teacher-model", "gpt-9", check=False,
    )  # fmt: skip
    assert result.returncode == 1 and "REJECTED (teacher-model-unknown)" in result.stderr
    assert "model 'gpt-9' is not served here" in result.stderr
