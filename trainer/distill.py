"""``immune-train distill``: a teacher model answers a profile's requests, as the Slips team made
their datasets with GPT-4o. The teacher is any OpenAI-compatible chat server (a large model on the
training machine, a hosted API, or in tests a local llama-cpp-python server).

Every record ``prepare --prompt-profile`` wrote is sent as the client sends it (its messages,
``max_tokens`` and temperature); an answer replaces the record's own only when it passes the
profile's contract checks (trainer.prompts.contract) and ended before the limit. Refusals, teacher
errors and answers that break the contract are reported and left out, never trained on.

The output is appended one record per line as answers arrive, so an interrupted run resumes where
it stopped: a rerun skips the ids already written (a torn last line is dropped first)."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.reasons import Reason
from trainer.dataset.records import ChatMessage, ChatRecord, read_records
from trainer.dataset.slips import clean_answer
from trainer.errors import TrainerError
from trainer.prompts import get_profile
from trainer.prompts.contract import AnswerContext, contract_failures
from trainer.prompts.profile import PromptProfile

log = logging.getLogger(__name__)

#: The files of a prepared dataset folder that are distilled (``stats.json`` is copied beside).
SPLITS = ("train.jsonl", "eval.jsonl")
#: Waits between tries of a request the teacher could not answer right now (429, 5xx, timeout).
RETRY_WAITS_S = (1.0, 4.0)
_REFUSAL = re.compile(
    r"^\W*(?:i'?m sorry|i am sorry|sorry,|i (?:cannot|can't|can not|won't|am unable|'m unable)|"
    r"as an ai\b|i apologi[sz]e)",
    re.IGNORECASE,
)
Status = Literal["written", "refused", "failed", "contract"]


class TeacherDownError(TrainerError):
    """The teacher cannot be reached or refuses our credentials: no request can succeed."""


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    content: str | None = None


class _Choice(BaseModel):
    model_config = ConfigDict(extra="ignore")
    message: _Message
    finish_reason: str | None = None


class _Usage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    completion_tokens: int | None = None


class ChatCompletion(BaseModel):
    """The part of an OpenAI chat completion distill reads (everything else is ignored)."""

    model_config = ConfigDict(extra="ignore")
    choices: Annotated[list[_Choice], Field(min_length=1)]
    usage: _Usage | None = None


@dataclass(frozen=True)
class Teacher:
    """Where the teacher is and how hard to push it."""

    url: str
    model: str
    api_key: str | None = None
    concurrency: int = 4
    timeout_s: float = 300.0

    @property
    def endpoint(self) -> str:
        """The chat completions URL (``URL`` may be the server root, its ``/v1`` or the endpoint)."""
        base = self.url.rstrip("/")
        if base.endswith("/chat/completions"):
            return base
        return f"{base}/chat/completions" if base.endswith("/v1") else f"{base}/v1/chat/completions"


@dataclass(frozen=True)
class Outcome:
    """What became of one record."""

    record_id: str
    status: Status
    reason: str = ""
    record: ChatRecord | None = None


@dataclass
class SplitReport:
    """One distilled file: how many answers were written, resumed and left out, and why."""

    source: str
    records: int
    resumed: int = 0
    written: int = 0
    left_out: Counter[str] = field(default_factory=Counter)
    #: Up to 20 (record id, why) of the answers left out, for the operator to look at.
    examples: list[tuple[str, str]] = field(default_factory=list)

    def add(self, outcome: Outcome) -> None:
        """Count ``outcome``."""
        if outcome.status == "written":
            self.written += 1
            return
        self.left_out[outcome.status] += 1
        if len(self.examples) < 20:
            self.examples.append((outcome.record_id, outcome.reason))

    def as_json(self) -> dict[str, object]:
        """For stats.json."""
        return {
            "records": self.records,
            "resumed": self.resumed,
            "written": self.written,
            "left_out": dict(self.left_out),
            "examples": [list(example) for example in self.examples],
        }


def request_profile(record: ChatRecord) -> PromptProfile:
    """The profile a record's request was rendered by (prepare --prompt-profile records only)."""
    name = record.meta.get("profile")
    if not name or record.meta.get("request") not in ("final", "reduction"):
        raise TrainerError(
            Reason.BAD_INPUT,
            f"record {record.id} was not rendered by a prompt profile (prepare it with --prompt-profile)",
        )
    return get_profile(name)


def judge(record: ChatRecord, completion: ChatCompletion, teacher: str) -> Outcome:
    """The answer of ``teacher`` (a model name) to ``record``, checked against the profile's contract."""
    choice = completion.choices[0]
    text = clean_answer(choice.message.content)
    if text is None:
        return Outcome(record.id, "failed", "the teacher returned an empty answer or an error message")
    if _REFUSAL.search(text):
        return Outcome(record.id, "refused", f"the teacher refused: {text[:80]!r}")
    limit = int(record.meta.get("max_tokens", "0"))
    used = completion.usage.completion_tokens if completion.usage else None
    ended = choice.finish_reason == "stop" and (used is None or not limit or used <= limit)
    profile = request_profile(record)
    context = AnswerContext(record.meta.get("source_ip"), ended)
    failed = contract_failures(text, profile.checks(record.meta["request"]), context)  # type: ignore[arg-type]
    if failed:
        return Outcome(record.id, "contract", f"the answer fails {', '.join(failed)}")
    messages = [*record.messages[:-1], ChatMessage(role="assistant", content=text)]
    answered = record.model_copy(update={"messages": messages, "teacher": teacher})
    return Outcome(record.id, "written", record=answered)


class Distiller:
    """Sends records to the teacher with bounded concurrency and appends the answers."""

    def __init__(self, teacher: Teacher, on_outcome: Callable[[Outcome], None] | None = None) -> None:
        self.teacher = teacher
        self.on_outcome = on_outcome or (lambda _: None)

    async def _ask(self, client: httpx.AsyncClient, record: ChatRecord) -> Outcome:
        body = {
            "model": self.teacher.model,
            "messages": record.prompt,
            "max_tokens": int(record.meta.get("max_tokens", "220")),
            "temperature": float(record.meta.get("temperature", "0.2")),
            "stream": False,
        }
        for attempt in range(len(RETRY_WAITS_S) + 1):
            try:
                response = await client.post(self.teacher.endpoint, json=body)
            except httpx.TimeoutException:
                reason = f"no answer within {self.teacher.timeout_s:g} s"
            except httpx.TransportError as exc:  # nothing listens, DNS, TLS: every request would fail
                raise TeacherDownError(
                    Reason.TEACHER_UNREACHABLE, f"cannot reach the teacher at {self.teacher.endpoint}: {exc}"
                ) from exc
            else:
                if response.status_code in (401, 403):
                    raise TeacherDownError(
                        Reason.TEACHER_UNAUTHORIZED,
                        f"the teacher at {self.teacher.endpoint} refused the credentials "
                        f"(HTTP {response.status_code}); give --api-key-file",
                    )
                if response.status_code == 404:  # no such endpoint or model: no request can succeed
                    raise TeacherDownError(
                        Reason.TEACHER_MODEL_UNKNOWN,
                        f"the teacher at {self.teacher.endpoint} has no model {self.teacher.model!r} or "
                        f"no such endpoint (HTTP 404): {response.text[:200]}",
                    )
                if response.status_code == 200:
                    return self._read(record, response)
                reason = f"HTTP {response.status_code}: {response.text[:160]!r}"
                if response.status_code != 429 and response.status_code < 500:
                    return Outcome(record.id, "failed", reason)  # this request is wrong: retrying is no use
            if attempt < len(RETRY_WAITS_S):
                await asyncio.sleep(RETRY_WAITS_S[attempt])
        return Outcome(record.id, "failed", reason)

    def _read(self, record: ChatRecord, response: httpx.Response) -> Outcome:
        try:
            completion = ChatCompletion.model_validate_json(response.content)
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(map(str, error["loc"])) or "body"
            return Outcome(
                record.id,
                "failed",
                f"the teacher's reply is not an OpenAI chat completion ({where}: {error['msg']}): "
                f"{response.text[:80]!r}",
            )
        return judge(record, completion, self.teacher.model)

    async def run(self, records: list[ChatRecord], output: Path, report: SplitReport) -> None:
        """Answer ``records`` and append the good answers to ``output``, one line each."""
        headers = {"Authorization": f"Bearer {self.teacher.api_key}"} if self.teacher.api_key else {}
        gate = asyncio.Semaphore(self.teacher.concurrency)
        limits = httpx.Limits(max_connections=self.teacher.concurrency)

        async def one(client: httpx.AsyncClient, record: ChatRecord) -> Outcome:
            async with gate:
                return await self._ask(client, record)

        async with httpx.AsyncClient(
            timeout=self.teacher.timeout_s, headers=headers, limits=limits
        ) as client:
            pending = [asyncio.create_task(one(client, record)) for record in records]
            try:
                with output.open("a", encoding="utf-8") as handle:
                    for finished in asyncio.as_completed(pending):
                        outcome = await finished
                        if outcome.record is not None:
                            # One writer (this loop) and a flush per line: a crash tears at most the last.
                            handle.write(outcome.record.model_dump_json(exclude_defaults=True) + "\n")
                            handle.flush()
                        else:
                            log.warning("left out %s: %s", outcome.record_id, outcome.reason)
                        report.add(outcome)
                        self.on_outcome(outcome)
            finally:
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)


def already_written(output: Path) -> set[str]:
    """Ids of the records an earlier run wrote to ``output``; a torn last line is removed."""
    if not output.is_file():
        return set()
    kept: list[str] = []
    ids: set[str] = set()
    lines = output.read_text(encoding="utf-8").splitlines(keepends=True)
    for number, line in enumerate(lines, 1):
        try:
            record = ChatRecord.model_validate_json(line)
        except ValidationError:
            if number == len(lines):  # the line a crash cut short
                log.warning("%s: dropping its torn last line", output)
                continue
            raise TrainerError(Reason.BAD_RECORD, f"{output}:{number}: not a distilled record") from None
        ids.add(record.id)
        kept.append(line if line.endswith("\n") else line + "\n")
    if len(kept) != len(lines) or (lines and not lines[-1].endswith("\n")):
        output.write_text("".join(kept), encoding="utf-8")
    return ids


def distill_split(
    source: Path, output: Path, teacher: Teacher, on_outcome: Callable[[Outcome], None] | None = None
) -> SplitReport:
    """Distill one prepared file into ``output`` (resuming what is there)."""
    records = list(read_records(source))
    for record in records:
        request_profile(record)  # every record is checked before the first request goes out
    done = already_written(output)
    report = SplitReport(source=source.name, records=len(records))
    todo = [record for record in records if record.id not in done]
    report.resumed = len(records) - len(todo)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.touch(mode=0o644)
    asyncio.run(Distiller(teacher, on_outcome).run(todo, output, report))
    return report


def pending_count(data_dir: Path, output_dir: Path) -> int:
    """How many requests a distill of ``data_dir`` into ``output_dir`` still has to send."""
    total = 0
    for name in SPLITS:
        if (data_dir / name).is_file():
            done = already_written(output_dir / name)
            total += sum(1 for record in read_records(data_dir / name) if record.id not in done)
    return total


def distill(
    data_dir: Path,
    output_dir: Path,
    teacher: Teacher,
    on_outcome: Callable[[Outcome], None] | None = None,
) -> dict[str, SplitReport]:
    """Distill a prepared folder (train.jsonl, eval.jsonl) into ``output_dir``; ``stats.json`` is
    copied beside with a ``distill`` section, so eval and publish still find the request fit."""
    if not data_dir.is_dir():
        raise TrainerError(Reason.MISSING_DATA, f"{data_dir}: no such folder (run immune-train prepare)")
    splits = [name for name in SPLITS if (data_dir / name).is_file()]
    if not splits:
        raise TrainerError(Reason.MISSING_DATA, f"{data_dir}: no train.jsonl or eval.jsonl to distill")
    if data_dir.resolve() == output_dir.resolve():
        raise TrainerError(
            Reason.BAD_INPUT, "distill writes beside its input, not over it: give another --output"
        )
    reports = {
        name: distill_split(data_dir / name, output_dir / name, teacher, on_outcome) for name in splits
    }
    stats_file = data_dir / "stats.json"
    stats = json.loads(stats_file.read_text()) if stats_file.is_file() else {}
    stats["distill"] = {
        "teacher_url": teacher.endpoint,
        "teacher_model": teacher.model,
        **{name.removesuffix(".jsonl"): report.as_json() for name, report in reports.items()},
    }
    (output_dir / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    if not any(report.written + report.resumed for report in reports.values()):
        reasons = Counter[str]()
        for report in reports.values():
            reasons.update(report.left_out)
        first = next((r.examples[0][1] for r in reports.values() if r.examples), "no records")
        raise TrainerError(
            Reason.NO_TEACHER_ANSWERS,
            f"the teacher gave no usable answer ({dict(reasons)}; e.g. {first})",
        )
    return reports
