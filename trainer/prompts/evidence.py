"""The evidence of one Slips incident, read from a dataset record's text (``dag_analysis``) and grouped
the way Slips' alert summary groups it for its digest: one item per pattern of similar evidence
descriptions, with how many evidences it holds, their severities and a few sample values.

The record text lists groups as ``• HH:MM[-HH:MM] - <what> [SEVERITY]`` headers, each followed by
``  - <evidence description>`` lines (``(xN)`` when repeated) and possibly ``  - ... and N more
variations``. Only those lines are evidence; the header block and totals are metadata."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

#: How many sample values one digest item carries (Slips keeps up to five).
MAX_SAMPLES = 5
SEVERITIES = ("critical", "high", "medium", "low", "info")

_GROUP = re.compile(
    r"^•\s*(?P<time>\d{2}:\d{2}(?:-\d{2}:\d{2})?)\s*-\s*(?P<what>.*?)\s*\[(?P<sev>[A-Z]+)\]\s*$"
)
_EVIDENCE = re.compile(r"^\s+-\s+(?P<text>.+?)\s*$")
_REPEAT = re.compile(r"\s*\(x(?P<n>\d+)\)$")
_MORE = re.compile(r"^\.\.\.\s*and\s+(?P<n>\d+)\s+more variations?$")
_LEVEL = re.compile(r"threat level:\s*(?P<level>critical|high|medium|low|info)\b", re.IGNORECASE)
_IPV4 = r"(?:\d{1,3}\.){3}\d{1,3}"
_VALUE = re.compile(
    rf"(?P<ip>{_IPV4}(?::\d{{1,5}})?(?:/\d{{1,2}})?)"
    r"|(?P<port>\b\d{1,5}/(?:TCP|UDP)\b)"
    r"|(?P<domain>\b(?:[a-z0-9-]+\.)+(?:com|net|org|io|info|biz|ru|cn|de|uk|xyz|top)\b)",
    re.IGNORECASE,
)
_NUMBER = re.compile(r"\b\d+(?:\.\d+)?\b")
_CONFIDENCE = re.compile(r"Confidence:\s*(?P<c>[01](?:\.\d+)?)")


@dataclass(frozen=True)
class Evidence:
    """One evidence description of the incident, with its repeat count."""

    text: str
    count: int
    severity: str
    time: str


@dataclass
class DigestItem:
    """Similar evidences grouped under one normalised description pattern."""

    pattern: str
    example: str
    count: int = 0
    severities: Counter[str] = field(default_factory=Counter)
    samples: list[str] = field(default_factory=list)
    first: str = ""
    last: str = ""

    def line(self) -> str:
        """The item as one digest line (without the leading ``- ``)."""
        severity = ", ".join(
            f"{name} {self.severities[name]}" for name in SEVERITIES if self.severities[name]
        )
        parts = [f"{self.pattern} (evidences: {self.count}; severity: {severity}"]
        if self.first:
            span = self.first if self.first == self.last else f"{self.first} to {self.last}"
            parts.append(f"; seen: {span}")
        if self.samples:
            parts.append(f"; samples: {', '.join(self.samples)}")
        return "".join(parts) + ")"


def parse_evidence(text: str) -> list[Evidence]:
    """Every evidence line of an incident's text, in order; ``... and N more variations`` adds N
    evidences like the first line of its group."""
    found: list[Evidence] = []
    severity, time, group_first = "info", "", None
    for raw in text.splitlines():
        if header := _GROUP.match(raw):
            severity, time, group_first = header["sev"].lower(), header["time"], None
            continue
        line = _EVIDENCE.match(raw)
        if line is None or not raw.startswith(" "):
            continue
        body = line["text"]
        if more := _MORE.match(body):
            if group_first is not None:
                found.append(Evidence(group_first.text, int(more["n"]), group_first.severity, time))
            continue
        count = 1
        if repeat := _REPEAT.search(body):
            count, body = int(repeat["n"]), body[: repeat.start()]
        level = _LEVEL.search(body)
        evidence = Evidence(body.strip(), count, level["level"].lower() if level else severity, time)
        found.append(evidence)
        if group_first is None:
            group_first = evidence
    return found


def pattern_of(text: str) -> str:
    """The description with its values (addresses, ports, domains, numbers) replaced by placeholders."""

    def placeholder(match: re.Match[str]) -> str:
        return f"<{match.lastgroup}>"

    return " ".join(_NUMBER.sub("<n>", _VALUE.sub(placeholder, text)).split())


def _values(text: str, source_ip: str) -> list[str]:
    values = []
    for match in _VALUE.finditer(text):
        value = match.group(0)
        if value.split(":")[0] != source_ip:
            values.append(value)
    return values


def digest(evidence: list[Evidence], source_ip: str) -> list[DigestItem]:
    """Group ``evidence`` by pattern, largest groups first (ties: first seen first)."""
    items: dict[str, DigestItem] = {}
    for one in evidence:
        pattern = pattern_of(one.text)
        item = items.setdefault(pattern, DigestItem(pattern=pattern, example=one.text))
        item.count += one.count
        item.severities[one.severity] += one.count
        for value in _values(one.text, source_ip):
            if value not in item.samples and len(item.samples) < MAX_SAMPLES:
                item.samples.append(value)
        start, _, end = one.time.partition("-")
        if start:
            item.first = min(item.first or start, start)
            item.last = max(item.last, end or start)
    order = {pattern: index for index, pattern in enumerate(items)}
    return sorted(items.values(), key=lambda item: (-item.count, order[item.pattern]))


def mean_confidence(text: str) -> float | None:
    """The mean of the evidences' stated confidences, when any state one."""
    values = [float(match["c"]) for match in _CONFIDENCE.finditer(text)]
    return sum(values) / len(values) if values else None
