"""The Slips task checks: what one generated answer is scored on. Records of a client profile
(``prepare --prompt-profile``) are scored by that client's output contract (trainer.prompts.contract);
older records against what the reference (teacher) answers look like.

Every check is 1.0 (pass) or 0.0 (fail), except ROUGE-L (F1 against the reference)."""

from __future__ import annotations

import re
from collections.abc import Callable

from trainer.dataset.records import ChatRecord
from trainer.prompts import get_profile
from trainer.prompts.contract import AnswerContext, contract_scores, stated_verdict

_VERDICT = {
    "slips-risk": re.compile(r"risk\s*level\W{0,6}\s*(low|medium|high|critical)", re.IGNORECASE),
    "slips-summary": re.compile(
        r"\b(critical|high|medium|low|info|malicious|benign|normal|suspicious)\b", re.IGNORECASE
    ),
}
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
_BULLET = re.compile(r"^\s*(?:[•*\-]|\d+\.)\s+\S", re.MULTILINE)
#: Word n-grams copied from the prompt are counted with this n (short ones are ordinary phrases).
ECHO_NGRAM = 8
#: An answer echoes the prompt when its copied share exceeds the reference's by more than this.
ECHO_SLACK = 0.25

Rouge = Callable[[str, str], float]


def paragraphs(text: str) -> int:
    return len([p for p in _PARAGRAPH_BREAK.split(text.strip()) if p.strip()])


def same_layout(reference: str, answer: str) -> bool:
    """The answer is laid out like the reference: paragraph count within one, and bullet lists
    where the reference has them (Slips' teacher answers are multi-paragraph, bulleted reports)."""
    if not answer.strip():
        return False
    close = abs(paragraphs(answer) - paragraphs(reference)) <= 1
    return close and bool(_BULLET.search(answer)) == bool(_BULLET.search(reference))


def copied_share(source: str, text: str, n: int = ECHO_NGRAM) -> float:
    """The share of ``text``'s word n-grams that appear verbatim in ``source``."""
    words = text.split()
    if len(words) < n:
        return 0.0
    source_words = source.split()
    known = {tuple(source_words[i : i + n]) for i in range(len(source_words) - n + 1)}
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return sum(gram in known for gram in grams) / len(grams)


def no_prompt_echo(record: ChatRecord, answer: str) -> bool:
    """The answer does not copy the prompt beyond what the reference itself copies (Slips summaries
    legitimately repeat the incident header)."""
    prompt = "\n".join(m["content"] for m in record.prompt)
    return copied_share(prompt, answer) <= copied_share(prompt, record.answer) + ECHO_SLACK


def profile_scores(record: ChatRecord, answer: str, finished: bool, rouge: Rouge) -> dict[str, float]:
    """Scores of an answer to a client profile's request: the profile's contract checks for that
    request kind (reductions prefixed ``reduction_``), ROUGE-L and the echo check."""
    kind = record.meta.get("request", "final")
    profile = get_profile(record.meta["profile"])
    context = AnswerContext(record.meta.get("source_ip"), finished)
    scores = {
        **contract_scores(answer, profile.checks(kind), context),  # type: ignore[arg-type]
        "rouge_l": rouge(record.answer, answer),
        "no_prompt_echo": float(no_prompt_echo(record, answer)),
    }
    if kind != "final":
        return {f"reduction_{name}": value for name, value in scores.items()}
    # Stating a verdict is the contract; stating the reference's is being right (measurable only where
    # the held-out references are not all one verdict, which Slips' own datasets nearly are).
    if (expected := stated_verdict(record.answer)) is not None:
        scores["verdict_agrees"] = float(stated_verdict(answer) == expected)
    return scores


def task_scores(record: ChatRecord, answer: str, finished: bool, rouge: Rouge) -> dict[str, float]:
    """Scores of one generated ``answer``; ``finished`` says it ended before the token budget."""
    if record.meta.get("profile"):
        return profile_scores(record, answer, finished, rouge)
    scores = {
        "rouge_l": rouge(record.answer, answer),
        "non_empty": float(bool(answer.strip())),
        "within_budget": float(finished),
        "no_prompt_echo": float(no_prompt_echo(record, answer)),
        "same_layout": float(same_layout(record.answer, answer)),
    }
    source_ip = record.meta.get("source_ip")
    if source_ip:
        scores["names_source_ip"] = float(source_ip in answer)
    if record.task in _VERDICT:
        scores["gives_verdict"] = float(bool(_VERDICT[record.task].search(answer)))
    return scores
