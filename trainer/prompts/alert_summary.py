"""Profile ``alert-summary-v2``: the requests of Slips' alert-summary module (Stratosphere Linux IPS,
module ``alert_summary``, prompt version ``alert-summary-v2``).

Where the format comes from: the module's request layout as recorded in ../shared/notes/slips-requests.md
(section names and order, metadata fields, budgets, token estimate, reduction layers). The wording
below is this project's own rendering of that format; the section headers and the prompt version line
are the format's content, kept exactly because the model must recognise them.

The request plan:
1. the incident's evidence is grouped into digest items (trainer.prompts.evidence);
2. the final request is rendered; when it is over the input budget (3,200 tokens, estimated as
   characters / 4), the digest lines are split into chunks whose reduction requests each fit 2,400,
   every chunk is sent as a reduction request, and the answers become the next layer's digest items;
3. repeated until the final request fits, at most six layers (then the final goes out as it is)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace

from trainer.prompts.evidence import DigestItem, digest, mean_confidence, parse_evidence
from trainer.prompts.profile import (
    ClientRequest,
    IncidentFacts,
    ReadRequest,
    Reducer,
    RequestKind,
    estimate_tokens,
)

PROMPT_VERSION = "alert-summary-v2"
VERSION_LINE = f"- Prompt version: {PROMPT_VERSION}"
FINAL_BUDGET = 3200
REDUCTION_BUDGET = 2400
FINAL_MAX_TOKENS = 220
REDUCTION_MAX_TOKENS = 180
MAX_LAYERS = 6
#: Digest items an incident needs before practice reductions are made for it.
PRACTICE_MIN_ITEMS = 6
TEMPERATURE = 0.2

FINAL_SYSTEM = (
    "You are a senior incident analyst reviewing alerts raised by the Slips intrusion detection system. "
    "Work only from the data you are given; recent alert history, when present, is cumulative context "
    "about the same host and not proof about the current alert. Answer in exactly one paragraph of plain "
    "text that explains the main suspicious behaviour, the evidence for and against it, whether the alert "
    "is a likely true positive, a likely false positive or uncertain, and how risky or urgent it is. Say "
    "so when the evidence is weak. Do not use bullet points, markdown, headings or JSON, and do not "
    "invent anything."
)
FINAL_OPENING = (
    "Translate the following Slips alert into one clear, concise paragraph that a human analyst can act on."
)
FINAL_TASK = (
    "YOUR TASK:\n"
    "1. Explain the main behaviour the evidence shows.\n"
    "2. Name the strongest evidence behind the alert.\n"
    "3. Say whether it is a likely true positive, a likely false positive or uncertain.\n"
    "4. State the risk or the urgency of a response.\n"
    "5. If recent history is given, say whether this alert continues or changes that trend.\n"
    "6. If recent history is given, use it as context only, never as proof."
)
FINAL_RULES = (
    "OUTPUT RULES:\n"
    "- Write exactly one paragraph.\n"
    "- Plain text only: no bullet points, markdown, headings or JSON.\n"
    "- Use only the data above; invent nothing.\n"
    "- Treat recent history as context, not as evidence for this alert.\n"
    "- Say so when the evidence is weak.\n"
    f"{VERSION_LINE}"
)
REDUCTION_SYSTEM = (
    "You compress one part of the evidence of a Slips alert for a later analysis step. Write one "
    "paragraph of plain text that keeps the behaviours, time ranges, counts, indicators (addresses, "
    "ports, domains) and any clue that the activity may be benign. No introduction, no verdict, no "
    "bullet points, markdown or JSON."
)
REDUCTION_OPENING = "Compress the evidence subset below into one paragraph for the final alert analysis."
REDUCTION_RULES = (
    "RULES:\n"
    "- One paragraph of plain text.\n"
    "- Keep behaviours, time ranges, counts, indicators and false-positive clues.\n"
    "- No introduction and no verdict.\n"
    f"{VERSION_LINE}"
)
NO_EVIDENCE = "- No evidence details were available."
_VERSION = re.compile(r"^\s*-\s*Prompt version:\s*(\S+)\s*$", re.MULTILINE)
_METADATA = re.compile(r"^- ([A-Za-z][A-Za-z ]{1,40}): (.*)$", re.MULTILINE)
_CHUNK = re.compile(r"^(\d+)/(\d+)$")


def _number(value: float | None, digits: int) -> str:
    return "unknown" if value is None else f"{value:.{digits}f}"


def metadata_block(incident: IncidentFacts, patterns: int, layers: int) -> str:
    """The ``INCIDENT METADATA`` section."""
    start, _, end = incident.timeline.partition(" to ")
    time_range = f"{start} to {end}" if end else (incident.timeline or "unknown")
    confidence = mean_confidence(incident.text)
    events = "unknown" if incident.event_count is None else incident.event_count
    return "\n".join(
        [
            "INCIDENT METADATA:",
            f"- Alert ID: {incident.incident_id}",
            f"- Source IP: {incident.source_ip}",
            f"- Timewindow: {incident.timewindow or 'unknown'}",
            f"- Time Range: {time_range}",
            f"- Accumulated Threat Level: {_number(incident.threat_level, 2)}",
            f"- Alert Confidence: {_number(confidence, 2)}",
            f"- Correlated Evidence Records: {events}",
            f"- Grouped Evidence Patterns: {patterns}",
            f"- Completed Reduction Layers: {layers}",
        ]
    )


def _bullets(lines: Sequence[str]) -> str:
    return "\n".join(f"- {line}" for line in lines) if lines else NO_EVIDENCE


class AlertSummaryProfile:
    """Slips' ``alert-summary-v2`` final and reduction requests (budgets in Slips' estimate)."""

    name = PROMPT_VERSION
    task = "slips-summary"
    max_tokens = FINAL_MAX_TOKENS

    def __init__(self, input_budget: int = FINAL_BUDGET, reduction_budget: int = REDUCTION_BUDGET) -> None:
        self.input_budget = input_budget
        self.reduction_budget = reduction_budget

    def final_request(
        self, incident: IncidentFacts, lines: Sequence[str], patterns: int, layers: int
    ) -> ClientRequest:
        """The final request over ``lines`` (digest items, or the last layer's reductions)."""
        user = "\n\n".join(
            [
                FINAL_OPENING,
                metadata_block(incident, patterns, layers),
                "CURRENT ALERT EVIDENCE DIGEST:\n" + _bullets(lines),
                FINAL_TASK,
                FINAL_RULES,
            ]
        )
        messages = [{"role": "system", "content": FINAL_SYSTEM}, {"role": "user", "content": user}]
        return ClientRequest(
            "final", "final", messages, FINAL_MAX_TOKENS, TEMPERATURE, estimate_tokens(messages)
        )

    def reduction_request(
        self,
        incident: IncidentFacts,
        lines: Sequence[str],
        layer: int,
        chunk: tuple[int, int],
        layer_items: int,
        patterns: int,
    ) -> ClientRequest:
        """Reduction request ``chunk`` = (i, n) of ``layer`` over ``lines``."""
        index, chunks = chunk
        metadata = metadata_block(incident, patterns, layer - 1)
        user = "\n\n".join(
            [
                REDUCTION_OPENING,
                "\n".join(
                    [
                        metadata,
                        f"- Reduction layer: {layer}",
                        f"- Chunk: {index}/{chunks}",
                        f"- Source digest items in this layer: {layer_items}",
                    ]
                ),
                "EVIDENCE SUBSET:\n" + _bullets(lines),
                REDUCTION_RULES,
            ]
        )
        messages = [{"role": "system", "content": REDUCTION_SYSTEM}, {"role": "user", "content": user}]
        return ClientRequest(
            "reduction",
            f"reduce-L{layer}-{index}of{chunks}",
            messages,
            REDUCTION_MAX_TOKENS,
            TEMPERATURE,
            estimate_tokens(messages),
        )

    def _chunks(
        self, incident: IncidentFacts, lines: Sequence[str], layer: int, patterns: int
    ) -> list[list[int]]:
        """Indices of ``lines`` in consecutive chunks whose reduction requests fit the budget (a line
        too big alone gets a chunk of its own)."""
        empty = self.reduction_request(incident, [], layer, (99, 99), len(lines), patterns).estimated_tokens
        room = self.reduction_budget - empty
        chunks: list[list[int]] = [[]]
        used = 0
        for index, line in enumerate(lines):
            size = -(-(len(line) + 3) // 4)  # with "- " and the newline, rounded up: never under
            if chunks[-1] and used + size > room:
                chunks.append([])
                used = 0
            chunks[-1].append(index)
            used += size
        return chunks

    def requests(self, incident: IncidentFacts, reduce: Reducer) -> list[ClientRequest]:
        """The reduction layers the incident needs, then its final request."""
        items: list[DigestItem] = digest(parse_evidence(incident.text), incident.source_ip)
        lines = [item.line() for item in items]
        layer_items: Sequence[DigestItem] = items
        sent: list[ClientRequest] = []
        for layer in range(MAX_LAYERS + 1):
            final = self.final_request(incident, lines, len(items), layer)
            if final.estimated_tokens <= self.input_budget or layer == MAX_LAYERS:
                return [*sent, final]
            chunks = self._chunks(incident, lines, layer + 1, len(items))
            answers: list[str] = []
            for number, chunk in enumerate(chunks, 1):
                request = self.reduction_request(
                    incident,
                    [lines[i] for i in chunk],
                    layer + 1,
                    (number, len(chunks)),
                    len(lines),
                    len(items),
                )
                if layer == 0:
                    request = replace(request, items=[layer_items[i] for i in chunk])
                else:
                    request = replace(request, texts=[lines[i] for i in chunk])
                sent.append(request)
                answers.append(reduce(request, incident))
            lines = answers
        raise AssertionError("unreachable: the last layer always returns")  # pragma: no cover

    def practice_requests(self, incident: IncidentFacts, reduce: Reducer) -> list[ClientRequest]:
        """For an incident with enough digest items whose requests fit without reducing: its
        requests planned at half the budget, so that one reduction layer happens. Slips sends
        requests of exactly these shapes for larger incidents; the real datasets hold too few of
        those for the model to learn the reduction kind from them alone. Labels start ``practice-``."""
        items = digest(parse_evidence(incident.text), incident.source_ip)
        direct = self.final_request(incident, [item.line() for item in items], len(items), 0)
        if len(items) < PRACTICE_MIN_ITEMS or direct.estimated_tokens > self.input_budget:
            return []
        empty = self.final_request(incident, [], len(items), 1).estimated_tokens
        half = empty + (direct.estimated_tokens - empty) // 2
        smaller = AlertSummaryProfile(half, max(half * self.reduction_budget // self.input_budget, empty))
        return [
            replace(request, label=f"practice-{request.label}")
            for request in smaller.requests(incident, reduce)
        ]

    def checks(self, kind: RequestKind) -> tuple[str, ...]:
        """Final answers: the whole contract; reductions: one plain paragraph, no verdict."""
        if kind == "final":
            return ("one_paragraph", "plain_text", "gives_verdict", "states_risk", "names_source_ip")
        return ("one_paragraph", "plain_text", "no_verdict")

    def read_request(self, messages: Sequence[dict[str, str]]) -> ReadRequest | str:
        """A final or reduction request of this version, read by its section headers, its metadata
        lines and its version line."""
        user = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), None)
        if user is None:
            return "no user message"
        versions = _VERSION.findall(user)
        if not versions or versions[-1] != PROMPT_VERSION:
            found = versions[-1] if versions else "none"
            return f"prompt version {found}, not {PROMPT_VERSION}"
        fields = dict(_METADATA.findall(user))
        incident = fields.get("Alert ID", "").strip()
        source = fields.get("Source IP", "").strip().split(" ")[0]  # Slips may add "(hostname)"
        if "INCIDENT METADATA:" not in user or not incident or not source:
            return "no INCIDENT METADATA with an Alert ID and a Source IP"
        if "CURRENT ALERT EVIDENCE DIGEST:" in user:
            return ReadRequest("final", "final", incident, source)
        chunk = _CHUNK.match(fields.get("Chunk", "").strip())
        layer = fields.get("Reduction layer", "").strip()
        if "EVIDENCE SUBSET:" in user and chunk and layer.isdigit():
            return ReadRequest("reduction", f"reduce-L{layer}-{chunk[1]}of{chunk[2]}", incident, source)
        return "neither a final request (CURRENT ALERT EVIDENCE DIGEST) nor a reduction (EVIDENCE SUBSET)"
