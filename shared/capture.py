"""Captured requests: what a device records of the requests it serves (opt-in, ``[capture]``), and the
chunks in which the operator pulls them over the signed command channel (docs/protocol.md)."""

from __future__ import annotations

import hashlib
from typing import Annotated, ClassVar, Literal

from pydantic import AwareDatetime, Field, model_validator

from shared.manifest import ModelName
from shared.schema import Contract, Sha256Hex, canonical_json

#: The address kinds a device can redact before anything is stored.
RedactionKind = Literal["ipv4", "ipv6", "mac"]
#: The largest exchange a device captures: a Slips request is tens of KiB; a bigger one is not kept.
MAX_EXCHANGE_BYTES = 192 * 1024
#: The most a pull may ask for in one answer (an exchange always fits, so every chunk makes progress).
MAX_CHUNK_BYTES = 384 * 1024
DEFAULT_CHUNK_BYTES = 256 * 1024
Count = Annotated[int, Field(ge=0)]
Seq = Annotated[int, Field(ge=0, le=2**53)]
#: A capture store's identity: a new store (a file deleted by hand) restarts its sequence numbers.
StoreId = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]


class CapturedMessage(Contract):
    role: Literal["system", "user", "assistant", "tool"]
    content: Annotated[str, Field(max_length=MAX_EXCHANGE_BYTES)]


class CapturedExchange(Contract):
    """One answered request as the client sent it and the model answered it."""

    MAX_BYTES: ClassVar[int] = MAX_EXCHANGE_BYTES + 4096
    WHAT: ClassVar[str] = "captured exchange"

    #: The device-local sequence number (0 until stored).
    seq: Seq = 0
    at: AwareDatetime
    #: The API path it came in on, e.g. ``/v1/chat/completions``.
    endpoint: Annotated[str, Field(max_length=64)]
    #: The name the client asked for (an alias, often) and the model that answered.
    requested_model: Annotated[str, Field(max_length=128)] | None = None
    model_name: ModelName
    model_serial: Annotated[int, Field(ge=1, le=2**53)] | None = None
    model_sha256: Sha256Hex | None = None
    adapter: ModelName | None = None
    #: Chat requests carry ``messages`` (as the client sent them, without the model's own system
    #: prompt); raw completions carry ``prompt``.
    messages: Annotated[list[CapturedMessage], Field(max_length=64)] = []
    prompt: Annotated[str, Field(max_length=MAX_EXCHANGE_BYTES)] | None = None
    answer: Annotated[str, Field(max_length=MAX_EXCHANGE_BYTES)]
    finish_reason: Annotated[str, Field(max_length=32)]
    prompt_tokens: Count
    completion_tokens: Count
    max_tokens: Annotated[int, Field(ge=1)]
    temperature: float
    #: The client's ``Prompt version:`` line, when it sent one.
    prompt_version: Annotated[str, Field(max_length=64)] | None = None
    #: The address kinds replaced before it was stored (consistently within one capture store).
    redacted: list[RedactionKind] = []

    def content_sha256(self) -> str:
        """Identity for de-duplication: the request and the answer, not where or when it was seen."""
        content = {
            "messages": [m.model_dump() for m in self.messages],
            "prompt": self.prompt,
            "answer": self.answer,
        }
        return hashlib.sha256(canonical_json(content)).hexdigest()


class CaptureChunk(Contract):
    """A device's answer to one ``capture_pull``: exchanges after the asked sequence number, in order."""

    store_id: StoreId
    exchanges: Annotated[list[CapturedExchange], Field(max_length=4096)] = []
    #: What to ask for next (the last sequence number sent, or the one asked for when none was).
    next_seq: Seq
    more: bool


class CapturePullAction(Contract):
    """Send the captured exchanges after ``after_seq`` (and not older than ``since``), at most
    ``max_bytes`` of them; the operator repeats with the answer's ``next_seq`` while ``more``."""

    action: Literal["capture_pull"]
    #: The store the cursor belongs to; another store (recreated on the device) starts from 0.
    store_id: StoreId | None = None
    after_seq: Seq = 0
    since: AwareDatetime | None = None
    max_bytes: Annotated[int, Field(ge=4096, le=MAX_CHUNK_BYTES)] = DEFAULT_CHUNK_BYTES


class CapturePurgeAction(Contract):
    """Delete captured exchanges on the device: all of them, or those up to ``up_to_seq`` of the
    store ``store_id`` (what the operator already holds)."""

    action: Literal["capture_purge"]
    store_id: StoreId | None = None
    up_to_seq: Seq | None = None

    @model_validator(mode="after")
    def _cursor_of_a_store(self) -> CapturePurgeAction:
        if self.up_to_seq is not None and self.store_id is None:
            raise ValueError("up_to_seq needs the store_id it counts in")
        return self
