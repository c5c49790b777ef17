"""The output contract a client states in its prompts, as checks on one answer. The same checks
gate the answers trained on (offline composition, ``distill``) and score generated answers in ``eval``.

Each check takes the answer and what it needs to know about the request; 1.0 is a pass."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

_MARKDOWN = re.compile(
    r"\*\*|__|`|^\s{0,3}#{1,6}\s|^\s*[-*•+]\s+\S|^\s*\d+[.)]\s+\S|^\s*\|.*\|\s*$|\[[^\]]+\]\([^)]+\)",
    re.MULTILINE,
)
VERDICT = re.compile(r"\b(?:likely\s+)?(?:true|false)[\s-]+positive\b|\buncertain\b", re.IGNORECASE)
_LEVEL = r"(?:low|medium|moderate|elevated|high|critical|severe|minimal)"
_RISK_WORD = r"(?:risk|urgency|urgent|priority|severity|threat)"
RISK = re.compile(
    rf"\b{_LEVEL}\b[\w\s,-]{{0,30}}?\b{_RISK_WORD}|\b{_RISK_WORD}\b[\w\s:,-]{{0,30}}?\b{_LEVEL}\b"
    r"|\b(?:urgent|urgently|immediate(?:ly)?)\b",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class AnswerContext:
    """What the checks need to know about the request an answer is for."""

    source_ip: str | None = None
    #: False when generation stopped at the client's ``max_tokens`` (or the answer is over it).
    finished: bool = True


def one_paragraph(answer: str, _: AnswerContext) -> bool:
    """Exactly one paragraph: text, and no line break inside it."""
    text = answer.strip()
    return bool(text) and "\n" not in text


def looks_like_json(text: str) -> bool:
    """Whether the text is (or starts as) a JSON object or array."""
    stripped = text.strip()
    if not stripped.startswith(("{", "[")):
        return False
    try:
        json.loads(stripped)
    except json.JSONDecodeError:
        return stripped.startswith("{")
    return True


def plain_text(answer: str, _: AnswerContext) -> bool:
    """No Markdown (emphasis, headings, bullets, numbered lists, tables, code, links) and no JSON."""
    return bool(answer.strip()) and not _MARKDOWN.search(answer) and not looks_like_json(answer)


def gives_verdict(answer: str, _: AnswerContext) -> bool:
    """States likely true positive, likely false positive or uncertain."""
    return bool(VERDICT.search(answer))


def stated_verdict(text: str) -> str | None:
    """The first verdict ``text`` states, as ``true positive``, ``false positive`` or ``uncertain``
    (``likely`` and the spelling dropped); None when it states none."""
    found = VERDICT.search(text)
    if found is None:
        return None
    return re.sub(r"[\s-]+", " ", found.group(0).lower()).removeprefix("likely ")


def no_verdict(answer: str, _: AnswerContext) -> bool:
    """A reduction states no verdict: it only compresses evidence."""
    return bool(answer.strip()) and not VERDICT.search(answer)


def states_risk(answer: str, _: AnswerContext) -> bool:
    """States a risk or urgency level (looking through Markdown emphasis: ``**Risk Level:** High``)."""
    return bool(RISK.search(re.sub(r"[*_]+", "", answer)))


def names_source_ip(answer: str, context: AnswerContext) -> bool:
    """Names the alert's source address."""
    return bool(context.source_ip) and context.source_ip in answer


def finished(_: str, context: AnswerContext) -> bool:
    """Ended before the client's token limit."""
    return context.finished


CHECKS: dict[str, Callable[[str, AnswerContext], bool]] = {
    "one_paragraph": one_paragraph,
    "plain_text": plain_text,
    "gives_verdict": gives_verdict,
    "no_verdict": no_verdict,
    "states_risk": states_risk,
    "names_source_ip": names_source_ip,
    "within_budget": finished,
}


def contract_scores(answer: str, checks: Iterable[str], context: AnswerContext) -> dict[str, float]:
    """Each named check of ``answer``, plus ``within_budget``: 1.0 pass, 0.0 fail."""
    names = dict.fromkeys([*checks, "within_budget"])
    return {name: float(CHECKS[name](answer, context)) for name in names}


def contract_failures(answer: str, checks: Iterable[str], context: AnswerContext) -> list[str]:
    """The names of the checks ``answer`` fails (empty: it obeys the contract)."""
    return [name for name, score in contract_scores(answer, checks, context).items() if score < 1.0]
