"""Offline answers that obey a profile's contract, composed from the dataset's own teacher parts
instead of asking a teacher model (``immune-train distill`` is the other way).

- ``alert-summary-v2`` final: one plain paragraph that opens with the verdict (from the cause
  analysis' conclusion), the risk level and the source's behaviour, then supporting sentences of
  the behaviour summary, the conclusion and the risk justification, as many as fit the client's
  ``max_tokens``;
- its reductions: an extractive paragraph over the chunk's digest items (counts, severities, time
  spans, sample indicators), largest groups first, within the reduction's ``max_tokens``;
- ``risk-v1``: the cause analysis and risk assessment as the tooling's teachers wrote them."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from trainer.prompts.evidence import SEVERITIES, DigestItem
from trainer.prompts.profile import ClientRequest, IncidentFacts

#: Tokens kept free below the client's limit, so a model that learns the answer ends before it.
MARGIN_TOKENS = 24
_FIELD = r"\*\*{name}:?\*\*:?\s*(?P<value>.+?)(?=\n\s*\*\*[A-Z][^*]{{0,40}}:?\*\*|\Z)"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9])")
_MARKUP = re.compile(r"\*\*|__|`|^\s*(?:[-*•+]|\d+[.)])\s+|^#+\s*", re.MULTILINE)
_BRACKETS = re.compile(r"^\[(.*)\]$")
_FALSE_POSITIVE = re.compile(
    r"\b(legitimate|benign|false positive|normal (?:traffic|activity|behaviou?r))\b", re.I
)
_TRUE_POSITIVE = re.compile(
    r"\b(malicious|malware|compromised?|attack|botnet|c2|command and control)\b", re.I
)

TokenCount = Callable[[str], int]


def field(text: str, name: str) -> str | None:
    """The value of a ``**Name:** value`` section of a teacher's Markdown answer, as plain text."""
    match = re.search(_FIELD.format(name=re.escape(name)), text, re.DOTALL | re.IGNORECASE)
    return plain(match["value"]) if match else None


def plain(text: str) -> str:
    """Markdown removed, whitespace folded to single spaces (one paragraph)."""
    text = " ".join(_MARKUP.sub("", text).split())
    bracketed = _BRACKETS.match(text)
    return bracketed[1] if bracketed else text


def sentences(text: str) -> list[str]:
    """Sentences of a plain text, each ending in its punctuation."""
    parts = [part.strip() for part in _SENTENCE_END.split(text) if part.strip()]
    return [part if part[-1] in ".!?" else part + "." for part in parts]


def verdict_of(conclusion: str, risk_level: str) -> str:
    """The verdict a teacher's conclusion implies (its risk level when the conclusion says neither)."""
    benign, malicious = _FALSE_POSITIVE.search(conclusion), _TRUE_POSITIVE.search(conclusion)
    if malicious and not (benign and benign.start() < malicious.start()):
        return "likely true positive"
    if benign:
        return "likely false positive"
    if risk_level.lower() in ("high", "critical"):
        return "likely true positive"
    return "uncertain"


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:] if text[:2] != text[:2].upper() else text


def fit(
    required: Sequence[str], optional: Sequence[str], limit: int, count: TokenCount
) -> tuple[str, int] | None:
    """``required`` sentences plus as many ``optional`` ones (in order) as fit ``limit`` tokens, and
    how many optional ones made it; None when the required ones alone do not fit."""
    text = " ".join(required)
    if count(text) > limit:
        return None
    used = 0
    for sentence in optional:
        longer = f"{text} {sentence}"
        if count(longer) > limit:
            break
        text, used = longer, used + 1
    return text, used


class OfflineComposer:
    """Composes contract answers within each request's ``max_tokens`` (counted by ``count``)."""

    def __init__(self, count: TokenCount) -> None:
        self.count = count

    def summary_final(
        self, incident: IncidentFacts, behaviour: str, cause: str, risk: str, max_tokens: int
    ) -> str | None:
        """The final answer from the three teacher parts; None when a part lacks what it needs."""
        activity = field(behaviour, "Activity")
        level = field(risk, "Risk Level")
        if not activity or not level:
            return None
        level = level.split()[0].strip(".,:;").lower()
        summary = field(behaviour, "Summary") or ""
        conclusion = field(cause, "Conclusion") or ""
        justification = field(risk, "Justification") or ""
        verdict = verdict_of(conclusion, level)
        # Verdict, risk and source first: they survive an answer cut at the limit, and the first
        # tokens are what a short fine-tune learns first. Not "The alert ...": the prompt ends in
        # "alert-summary-v2", and a small model continues "alert" with the version string.
        opening = (
            f"{verdict.capitalize()}, {level} risk: {incident.source_ip} shows "
            f"{_lower_first(activity.rstrip('.'))}."
        )
        extra = [*sentences(summary)[:2], *sentences(conclusion)[:1], *sentences(justification)[:2]]
        body = fit([opening], extra, max_tokens - MARGIN_TOKENS, self.count)
        return body[0] if body else None

    def risk_final(self, cause: str, risk: str, max_tokens: int) -> str | None:
        """The risk framing's answer: the cause analysis, then the risk assessment, within the limit."""
        answer = f"{cause.strip()}\n\n{risk.strip()}"
        return answer if self.count(answer) <= max_tokens - MARGIN_TOKENS else None

    def reduction(self, request: ClientRequest, incident: IncidentFacts) -> str:
        """A reduction answer: the chunk's evidence in one paragraph, largest groups first."""
        limit = request.max_tokens - MARGIN_TOKENS
        if request.items:
            parts = [_describe(item) for item in request.items]
            total = sum(item.count for item in request.items)
        else:
            parts = [sentences(text)[0] for text in request.texts if text.strip()]
            total = 0
        opening = f"This evidence subset for {incident.source_ip} holds " + (
            f"{total} evidences in {len(parts)} groups." if total else f"{len(parts)} earlier summaries."
        )
        text, kept = fit([opening], parts, limit, self.count) or (opening, 0)
        if kept < len(parts):  # say what was left out, dropping the last kept group when needed
            note = f"{len(parts) - kept} smaller groups are left out."
            while kept and self.count(f"{text} {note}") > limit:
                kept -= 1
                text = fit([opening], parts[:kept], limit, self.count)[0]  # type: ignore[index]
                note = f"{len(parts) - kept} smaller groups are left out."
            text = f"{text} {note}"
        return text


def _describe(item: DigestItem) -> str:
    """One digest item as a sentence: count, severity, time span, what and sample indicators."""
    severity = " and ".join(name for name in SEVERITIES if item.severities[name]) or "unrated"
    when = ""
    if item.first:
        when = f" at {item.first}" if item.first == item.last else f" from {item.first} to {item.last}"
    what = re.sub(r"\s*(?:by Slips\s*)?threat level:\s*\w+\.?", "", item.example).strip().rstrip(".")
    samples = f" (for example {', '.join(item.samples[:3])})" if len(item.samples) > 1 else ""
    noun = "evidence" if item.count == 1 else "evidences"
    return f"{item.count} {severity} {noun}{when} like: {what}{samples}."
