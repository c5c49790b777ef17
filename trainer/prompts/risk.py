"""Profile ``risk-v1``: the risk-assessment request as the Slips tooling (Slips-tools' alert_summary
datasets) frames it: one user turn, an instruction followed by the incident text cut at about 3,500
words with a visible marker. The tooling has no prompt version line; ``risk-v1`` is this project's
name for that framing."""

from __future__ import annotations

from trainer.prompts.profile import ClientRequest, IncidentFacts, Reducer, RequestKind, estimate_tokens

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
