"""Importers for the Slips incident datasets (Stratosphere's ``summarization_dataset`` and
``risk_dataset`` formats): one record per incident, answered by the preferred usable teacher."""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.reasons import Reason
from trainer.dataset.problems import Problems
from trainer.dataset.records import ChatMessage, ChatRecord
from trainer.errors import TrainerError

SlipsTask = Literal["slips-summary", "slips-risk"]

DEFAULT_TEACHERS = ("gpt_4o", "gpt4o_mini", "qwen2_5:3b", "qwen2_5")

SUMMARY_SYSTEM_PROMPT = (
    "You are a network security analyst reading alerts from the Slips intrusion detection system. "
    "Summarise the incident for an operator: name the source IP, list the key events with their "
    "severity, and explain what the host is most likely doing."
)
RISK_INSTRUCTION = (
    "Here is an incident reported by the Slips intrusion detection system. Explain its possible "
    "causes (malicious activity, legitimate activity, misconfiguration) and assess the risk, "
    "ending with the risk level.\n\n"
)

# Teacher answers that are really error messages from the generation run: "LLM query failed ...",
# and a step's own failure report at the very start ("Behavior analysis failed: Error code: 429 ...").
_FAILED_ANSWER = re.compile(
    r"LLM query failed|^error:|Traceback \(most recent|\A\s*[A-Z][a-z]+(?: [a-z]+){0,3} failed:",
    re.IGNORECASE | re.MULTILINE,
)
_FENCE = re.compile(r"^```[a-zA-Z]*\s*$", re.MULTILINE)

# Per task: the key holding a teacher's answer, and the answer's parts in order.
_ANSWERS: dict[SlipsTask, tuple[str, tuple[str, ...]]] = {
    "slips-summary": ("llm_{teacher}_analysis", ("summary", "behavior_analysis")),
    "slips-risk": ("cause_risk_{teacher}", ("cause_analysis", "risk_assessment")),
}


class SlipsIncident(BaseModel):
    """The fields every Slips dataset record must have; teacher answers are read separately."""

    model_config = ConfigDict(extra="allow")

    incident_id: str = Field(min_length=1, max_length=128)
    source_ip: str = Field(min_length=1, max_length=64)
    dag_analysis: str = Field(min_length=1)
    category: str | None = None
    timewindow: str | int | None = None
    timeline: str | None = None
    threat_level: float | None = None
    event_count: int | None = None


def load_slips_file(path: Path) -> list[Any]:
    """The JSON array in a Slips dataset file (gzipped or not)."""
    if not path.is_file():
        raise TrainerError(Reason.MISSING_DATA, f"{path}: no such Slips dataset file")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TrainerError(Reason.BAD_INPUT, f"{path}: not a readable Slips JSON dataset ({exc})") from exc
    if not isinstance(data, list):
        raise TrainerError(
            Reason.BAD_INPUT, f"{path}: expected a JSON array of incidents, got {type(data).__name__}"
        )
    return data


def clean_answer(text: object) -> str | None:
    """A teacher's text without Markdown fences, or None when it is missing or an error message."""
    if not isinstance(text, str):
        return None
    text = _FENCE.sub("", text).strip()
    if not text or _FAILED_ANSWER.search(text):
        return None
    return text


def answer_parts(task: SlipsTask, chosen: Sequence[str] | None = None) -> tuple[str, ...]:
    """The parts of ``task``'s teacher answer to train on, in the dataset's order (default: all)."""
    known = _ANSWERS[task][1]
    if chosen is None:
        return known
    unknown = [part for part in chosen if part not in known]
    if unknown or not chosen:
        raise TrainerError(
            Reason.BAD_ANSWER_PARTS,
            f"unknown answer part {unknown[0]!r} for {task} (known: {', '.join(known)})"
            if unknown
            else f"no answer part chosen for {task}",
        )
    return tuple(part for part in known if part in chosen)


def pick_parts(
    raw: dict[str, Any], task: SlipsTask, teachers: Sequence[str], parts: Sequence[str] | None = None
) -> tuple[str, list[str]] | None:
    """The first teacher in preference order whose chosen answer parts are all usable, and those
    parts' texts in order."""
    key_pattern = _ANSWERS[task][0]
    parts = answer_parts(task, parts)
    for teacher in teachers:
        answer = raw.get(key_pattern.format(teacher=teacher))
        if not isinstance(answer, dict):
            continue
        texts = [clean_answer(answer.get(part)) for part in parts]
        if all(texts):
            return teacher, [t for t in texts if t]
    return None


def pick_answer(
    raw: dict[str, Any], task: SlipsTask, teachers: Sequence[str], parts: Sequence[str] | None = None
) -> tuple[str, str] | None:
    """The first teacher in preference order whose chosen answer parts are all usable: (teacher, text)."""
    picked = pick_parts(raw, task, teachers, parts)
    return (picked[0], "\n\n".join(picked[1])) if picked else None


def incident_messages(task: SlipsTask, incident: str) -> list[ChatMessage]:
    """The prompt as the Slips tooling frames it: a system prompt for summaries, user-only for risk."""
    if task == "slips-summary":
        return [
            ChatMessage(role="system", content=SUMMARY_SYSTEM_PROMPT),
            ChatMessage(role="user", content=incident),
        ]
    return [ChatMessage(role="user", content=RISK_INSTRUCTION + incident)]


def import_slips(
    path: Path,
    task: SlipsTask,
    teachers: Sequence[str],
    problems: Problems,
    parts: Sequence[str] | None = None,
) -> Iterator[ChatRecord]:
    """One record per incident of ``path`` answered with ``parts`` of the teacher's answer (default:
    all); incidents with no usable teacher answer are reported."""
    parts = answer_parts(task, parts)
    for index, raw in enumerate(load_slips_file(path)):
        where = f"{path.name}[{index}]"
        if not isinstance(raw, dict):
            problems.report(where, f"expected an object, got {type(raw).__name__}")
            continue
        try:
            incident = SlipsIncident.model_validate(raw)
        except ValidationError as exc:
            error = exc.errors()[0]
            problems.report(where, f"{'.'.join(map(str, error['loc']))}: {error['msg']}")
            continue
        picked = pick_answer(raw, task, teachers, parts)
        if picked is None:
            problems.report(
                where, f"incident {incident.incident_id} has no usable answer from {', '.join(teachers)}"
            )
            continue
        teacher, answer = picked
        yield ChatRecord(
            id=f"{task}:{incident.incident_id}",
            group=incident.incident_id,
            task=task,
            source=path.name,
            teacher=teacher,
            meta={"source_ip": incident.source_ip, "incident_id": incident.incident_id},
            messages=[
                *incident_messages(task, incident.dag_analysis),
                ChatMessage(role="assistant", content=answer),
            ],
        )
