"""A local stand-in for a large teacher (GPT-4o class), for runs on machines that cannot reach one: an
OpenAI-compatible chat server that answers Slips' alert-summary-v2 requests the way the dataset's own
GPT-4o teachers analysed the same incident (found by the request's Alert ID in ../shared/datasets/slips),
composed to the prompt's output rules by the project's offline composer; a reduction request is answered
from its own evidence subset. A request it cannot place is answered with HTTP 404, which ``distill``
reports and leaves out. It replays recorded analyses; it is not a model.

Run: .venv/bin/python -m bench.replay_teacher --port 8090 --tokenizer SmolLM2.gguf
"""

from __future__ import annotations

import argparse
import json
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from trainer.dataset.problems import Problems
from trainer.dataset.profiled import merged_incidents
from trainer.dataset.slips import DEFAULT_TEACHERS, pick_parts
from trainer.prompts.alert_summary import AlertSummaryProfile
from trainer.prompts.compose import OfflineComposer
from trainer.prompts.profile import ClientRequest, IncidentFacts

SLIPS = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "slips"
DATASETS = (SLIPS / "summarization_dataset_v3.json.gz", SLIPS / "risk_dataset.json.gz")
_SUBSET = re.compile(r"EVIDENCE SUBSET:\n(.*?)\n\n", re.DOTALL)


class ReplayTeacher:
    """Answers from recorded teacher analyses; ``count`` counts an answer's tokens."""

    def __init__(self, count: Callable[[str], int]) -> None:
        self.profile = AlertSummaryProfile()
        self.composer = OfflineComposer(count)
        self.incidents = {raw["incident_id"]: raw for _, raw in merged_incidents(list(DATASETS), Problems())}

    def answer(self, messages: list[dict[str, str]], max_tokens: int) -> str | None:
        """The composed answer, or None when the request is not one it can place."""
        read = self.profile.read_request(messages)
        if isinstance(read, str):
            return None
        facts = IncidentFacts(incident_id=read.incident_id, source_ip=read.source_ip, text="")
        if read.kind == "reduction":
            user = messages[-1]["content"]
            subset = _SUBSET.search(user + "\n\n")
            lines = [line[2:] for line in (subset[1] if subset else "").splitlines() if line.startswith("- ")]
            request = ClientRequest("reduction", read.label, messages, max_tokens, 0.2, 0, texts=lines)
            return self.composer.reduction(request, facts)
        raw = self.incidents.get(read.incident_id)
        if raw is None:
            return None
        behaviour = pick_parts(raw, "slips-summary", DEFAULT_TEACHERS, ["behavior_analysis"])
        risk = pick_parts(raw, "slips-risk", DEFAULT_TEACHERS)
        if behaviour is None or risk is None:
            return None
        return self.composer.summary_final(facts, behaviour[1][0], *risk[1], max_tokens)


def _handler(teacher: ReplayTeacher) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"{}")
            text = teacher.answer(body.get("messages", []), int(body.get("max_tokens") or 256))
            if text is None:
                self._send(404, {"error": {"message": "no recorded analysis for this request"}})
                return
            usage = {"prompt_tokens": 0, "completion_tokens": teacher.composer.count(text)}
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            self._send(200, {"object": "chat.completion", "choices": [choice], "usage": usage})

        def _send(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    return Handler


def token_counter(gguf: Path) -> Callable[[str], int]:
    """Tokens of a text in ``gguf``'s own vocabulary (its vocabulary only is loaded)."""
    import llama_cpp

    vocab = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    return lambda text: len(vocab.tokenize(text.encode(), add_bos=False, special=False))


@contextmanager
def replay_teacher(gguf: Path, port: int = 0) -> Iterator[str]:
    """The server on loopback for the block; yields its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", port), _handler(ReplayTeacher(token_counter(gguf))))
    thread = threading.Thread(target=server.serve_forever, name="replay-teacher", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--tokenizer", type=Path, required=True, help="the student's GGUF (answer lengths)")
    args = parser.parse_args()
    with replay_teacher(args.tokenizer, args.port) as url:
        print(f"answering on {url}/chat/completions (Ctrl-C to stop)")
        threading.Event().wait()


if __name__ == "__main__":
    main()
