"""Profile ``risk-v1``: the risk-assessment request as the Slips tooling (Slips-tools' alert_summary
datasets) frames it: one user turn, an instruction followed by the incident text cut at about 3,500
words with a visible marker. The tooling has no prompt version line; ``risk-v1`` is this project's
name for that framing."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

from trainer.prompts.profile import (
    ClientRequest,
    IncidentFacts,
    ReadRequest,
    Reducer,
    RequestKind,
    estimate_tokens,
)

PROFILE_NAME = "risk-v1"
MAX_WORDS = 3500
MAX_TOKENS = 400
TEMPERATURE = 0.2
INSTRUCTION = (
    "Here is an incident reported by the Slips intrusion detection system. Explain its possible "
    "causes (malicious activity, legitimate activity, misconfiguration) and assess the risk, "
    "ending with the risk level.\n\n"
)
CUT_MARKER = "\n[... incident cut at {kept} of {total} words ...]"
_SOURCE = re.compile(r"Source IP:\s*([0-9A-Fa-f.:]+)")


class RiskProfile:
    """One user-only request per incident; the answer must state a risk level."""

    name = PROFILE_NAME
    task = "slips-risk"
    max_tokens = MAX_TOKENS
    input_budget = MAX_WORDS  # words of incident text, as the tooling counts them

    def requests(self, incident: IncidentFacts, reduce: Reducer) -> list[ClientRequest]:
        """The single request (``reduce`` is unused: the tooling cuts instead of reducing)."""
        words = incident.text.split(" ")
        text = incident.text
        if len(words) > MAX_WORDS:
            text = " ".join(words[:MAX_WORDS]) + CUT_MARKER.format(kept=MAX_WORDS, total=len(words))
        messages = [{"role": "user", "content": INSTRUCTION + text}]
        return [ClientRequest("final", "final", messages, MAX_TOKENS, TEMPERATURE, estimate_tokens(messages))]

    def practice_requests(self, incident: IncidentFacts, reduce: Reducer) -> list[ClientRequest]:
        """None: the framing has one request kind."""
        return []

    def checks(self, kind: RequestKind) -> tuple[str, ...]:
        """The risk answer is a Markdown report by this framing; it must state a risk level."""
        return ("states_risk",)

    def read_request(self, messages: Sequence[dict[str, str]]) -> ReadRequest | str:
        """The one user turn starting with the instruction; the incident text carries no id, so the
        request is its own group (named by its hash)."""
        users = [m["content"] for m in messages if m.get("role") == "user"]
        if len(users) != 1 or not users[0].startswith(INSTRUCTION):
            return f"not a {PROFILE_NAME} request (one user turn starting with its instruction)"
        source = _SOURCE.search(users[0])
        group = hashlib.sha256(users[0].encode()).hexdigest()[:16]
        return ReadRequest("final", "final", group, source[1] if source else "")
