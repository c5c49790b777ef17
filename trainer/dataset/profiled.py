"""Slips incidents as the requests a client profile sends for them (``prepare --prompt-profile``):
every request of an incident (its reductions, then its final request) becomes one record whose
answer obeys the profile's contract. The summary and risk datasets describe the same incidents;
their teacher parts are merged by incident id, since a final summary answer needs both."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from trainer.dataset.problems import Problems
from trainer.dataset.records import ChatMessage, ChatRecord
from trainer.dataset.slips import SlipsIncident, load_slips_file, pick_parts
from trainer.prompts.compose import OfflineComposer
from trainer.prompts.contract import AnswerContext, contract_failures
from trainer.prompts.evidence import parse_evidence
from trainer.prompts.profile import ClientRequest, IncidentFacts, PromptProfile

#: The teacher recorded on reduction answers composed from the digest itself.
DIGEST_TEACHER = "digest"


def merged_incidents(paths: Sequence[Path], problems: Problems) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, record) per incident id, the fields of every file merged, in first-seen order."""
    merged: dict[str, tuple[str, dict[str, Any]]] = {}
    for path in paths:
        for index, raw in enumerate(load_slips_file(path)):
            where = f"{path.name}[{index}]"
            if not isinstance(raw, dict):
                problems.report(where, f"expected an object, got {type(raw).__name__}")
                continue
            ident = raw.get("incident_id")
            if not isinstance(ident, str) or not ident:
                problems.report(where, "incident_id: missing")
                continue
            if ident in merged:
                merged[ident][1].update({k: v for k, v in raw.items() if k not in merged[ident][1]})
            else:
                merged[ident] = (where, dict(raw))
    yield from merged.values()


def facts_of(incident: SlipsIncident) -> IncidentFacts:
    """What a profile renders from a validated dataset incident."""
    return IncidentFacts(
        incident_id=incident.incident_id,
        source_ip=incident.source_ip,
        text=incident.dag_analysis,
        timewindow="" if incident.timewindow is None else str(incident.timewindow),
        timeline=incident.timeline or "",
        threat_level=incident.threat_level,
        event_count=incident.event_count,
    )


class ProfiledImport:
    """Turns incidents into a profile's requests with offline contract answers."""

    def __init__(
        self,
        profile: PromptProfile,
        teachers: Sequence[str],
        composer: OfflineComposer,
        problems: Problems,
        practice: bool = True,
    ) -> None:
        self.profile = profile
        #: Also render the profile's practice requests (reductions for incidents that need none).
        self.practice = practice
        self.teachers = teachers
        self.composer = composer
        self.problems = problems
        #: Every request rendered, kept in training or not (the context a model needs is their maximum).
        self.rendered: list[tuple[str, ClientRequest]] = []

    def records(self, paths: Sequence[Path]) -> Iterator[ChatRecord]:
        """The records of every usable incident in ``paths``; the rest is reported."""
        for where, raw in merged_incidents(paths, self.problems):
            try:
                incident = SlipsIncident.model_validate(raw)
            except ValidationError as exc:
                error = exc.errors()[0]
                self.problems.report(where, f"{'.'.join(map(str, error['loc']))}: {error['msg']}")
                continue
            if not parse_evidence(incident.dag_analysis):
                self.problems.report(
                    where,
                    f"incident {incident.incident_id} has no evidence lines ('  - ' lines under a '•' group)",
                )
                continue
            yield from self._incident(where, raw, incident, paths[0].name)

    def _final_answer(
        self, raw: dict[str, Any], facts: IncidentFacts, request: ClientRequest
    ) -> tuple[str, str] | str:
        """(teacher, answer), or why there is none."""
        wanted = ", ".join(self.teachers)
        risk = pick_parts(raw, "slips-risk", self.teachers)
        if risk is None:
            return f"no usable cause and risk answer from {wanted}"
        if self.profile.task == "slips-risk":
            answer = self.composer.risk_final(*risk[1], request.max_tokens)
            return (risk[0], answer) if answer else f"the risk answer is over {request.max_tokens} tokens"
        behaviour = pick_parts(raw, "slips-summary", self.teachers, ["behavior_analysis"])
        if behaviour is None:
            return f"no usable behaviour analysis from {wanted}"
        answer = self.composer.summary_final(facts, behaviour[1][0], *risk[1], request.max_tokens)
        if answer is None:
            return "the teacher answers lack an activity or a risk level to compose from"
        return f"{behaviour[0]}+{risk[0]}", answer

    def _incident(
        self, where: str, raw: dict[str, Any], incident: SlipsIncident, source: str
    ) -> Iterator[ChatRecord]:
        facts = facts_of(incident)
        reductions: dict[str, str] = {}

        def reduce(request: ClientRequest, facts: IncidentFacts) -> str:
            answer = reductions[request.messages[-1]["content"]] = self.composer.reduction(request, facts)
            return answer

        requests = self.profile.requests(facts, reduce)
        if self.practice:
            requests += self.profile.practice_requests(facts, reduce)
        self.rendered.extend((incident.incident_id, request) for request in requests)
        final = self._final_answer(raw, facts, next(r for r in requests if r.kind == "final"))
        if isinstance(final, str):
            self.problems.report(where, f"incident {incident.incident_id}: {final}")
            return
        for request in requests:
            if request.kind == "final":
                teacher, answer = final
            else:
                teacher, answer = DIGEST_TEACHER, reductions[request.messages[-1]["content"]]
            context = AnswerContext(facts.source_ip, self.composer.count(answer) <= request.max_tokens)
            failed = contract_failures(answer, self.profile.checks(request.kind), context)
            if failed:
                self.problems.report(
                    where,
                    f"incident {incident.incident_id} {request.label}: answer fails {', '.join(failed)}",
                )
                continue
            yield ChatRecord(
                id=f"{self.profile.name}:{incident.incident_id}:{request.label}",
                group=incident.incident_id,
                task=self.profile.task,
                source=source,
                teacher=teacher,
                meta=request_meta(self.profile, facts, request),
                messages=[
                    *(ChatMessage.model_validate(m) for m in request.messages),
                    ChatMessage(role="assistant", content=answer),
                ],
            )


def request_meta(profile: PromptProfile, facts: IncidentFacts, request: ClientRequest) -> dict[str, str]:
    """What eval and distill need to know of a record's request."""
    return {
        "source_ip": facts.source_ip,
        "incident_id": facts.incident_id,
        "profile": profile.name,
        "request": request.kind,
        "label": request.label,
        "max_tokens": str(request.max_tokens),
        "temperature": str(request.temperature),
        "estimated_tokens": str(request.estimated_tokens),
    }


def request_sizes(
    imported: ProfiledImport, count: Callable[[list[dict[str, str]]], int]
) -> list[tuple[str, int, int]]:
    """(request id, real tokens, the client's estimate) of every request the import rendered (kept for
    training or not: the context a model needs is their maximum)."""
    return [
        (f"{incident}:{request.label}", count(request.messages), request.estimated_tokens)
        for incident, request in imported.rendered
    ]
