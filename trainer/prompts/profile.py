"""What a client prompt profile is: a versioned description of how one client (Slips' alert summary,
its risk tooling) turns an incident into the requests it sends, and the output contract it expects
back. Profiles are looked up by name (:func:`trainer.prompts.get_profile`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from trainer.prompts.evidence import DigestItem

RequestKind = Literal["final", "reduction"]


@dataclass(frozen=True)
class IncidentFacts:
    """The fields of a dataset incident a client's prompt is built from."""

    incident_id: str
    source_ip: str
    text: str
    timewindow: str = ""
    timeline: str = ""
    threat_level: float | None = None
    event_count: int | None = None


@dataclass(frozen=True)
class ClientRequest:
    """One request as the client sends it (chat messages and its generation settings)."""

    kind: RequestKind
    #: Stable within an incident: ``final``, or ``reduce-L<layer>-<chunk>of<chunks>``.
    label: str
    messages: list[dict[str, str]]
    max_tokens: int
    temperature: float
    #: The client's own size estimate of the request (Slips: characters / 4).
    estimated_tokens: int
    #: What a reduction compresses: digest items on the first layer, earlier answers after it.
    items: Sequence[DigestItem] = field(default_factory=tuple)
    texts: Sequence[str] = field(default_factory=tuple)


#: Answers a reduction request (the next layer's digest item), e.g. the offline composer.
Reducer = Callable[[ClientRequest, IncidentFacts], str]


@dataclass(frozen=True)
class ReadRequest:
    """What a profile reads back from a request the client really sent (a captured one)."""

    kind: RequestKind
    label: str
    #: The client's alert or incident id: every request of one alert lands on one side of the split.
    incident_id: str
    source_ip: str


class PromptProfile(Protocol):
    """A client's request builder and its output contract."""

    #: The profile's name, e.g. ``alert-summary-v2`` (the client's own prompt version when it has one).
    name: str
    #: The training task its records belong to (``slips-summary``, ``slips-risk``).
    task: str
    #: The largest ``max_tokens`` any of its requests asks for.
    max_tokens: int
    #: The client's input budget of one request, in its own estimate.
    input_budget: int

    def requests(self, incident: IncidentFacts, reduce: Reducer) -> list[ClientRequest]:
        """Every request the client sends for ``incident``, in order (reductions, then the final)."""
        ...

    def practice_requests(self, incident: IncidentFacts, reduce: Reducer) -> list[ClientRequest]:
        """Extra requests of the client's shapes, planned at a smaller budget so that every request
        kind appears in training (none for a profile with one kind)."""
        ...

    def checks(self, kind: RequestKind) -> tuple[str, ...]:
        """The contract checks an answer to a request of ``kind`` must pass (trainer.prompts.contract)."""
        ...

    def read_request(self, messages: Sequence[dict[str, str]]) -> ReadRequest | str:
        """Recognise a request of this profile's format (the client's own wording may differ from this
        project's rendering, so the format's fixed parts are what is read); why not, as a string."""
        ...


def estimate_tokens(messages: Sequence[dict[str, str]]) -> int:
    """Slips' size estimate of a request: its characters divided by four."""
    return sum(len(m["content"]) for m in messages) // 4
