"""The training record every importer produces: ChatML ``messages`` plus what the split, the
evaluation and the audit trail need."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from shared.reasons import Reason
from trainer.errors import TrainerError

Role = Literal["system", "user", "assistant"]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Role
    content: Annotated[str, Field(min_length=1)]


class ChatRecord(BaseModel):
    """One conversation to train on; the last message is the answer the model learns."""

    model_config = ConfigDict(extra="forbid")

    id: Annotated[str, Field(min_length=1, max_length=256)]
    #: Records sharing a group (a Slips incident) always land on the same side of the split.
    group: Annotated[str, Field(min_length=1, max_length=256)]
    task: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,63}$")]
    source: str
    teacher: str | None = None
    truncated: bool = False
    #: Facts the task checks use (for Slips: the incident's source IP).
    meta: dict[str, str] = {}
    messages: Annotated[list[ChatMessage], Field(min_length=2)]

    @model_validator(mode="after")
    def _ends_with_answer(self) -> ChatRecord:
        if self.messages[-1].role != "assistant":
            raise ValueError("the last message must be the assistant's answer")
        if not any(m.role == "user" for m in self.messages[:-1]):
            raise ValueError("a record needs at least one user message before the answer")
        return self

    @property
    def prompt(self) -> list[dict[str, str]]:
        """Everything before the answer, as plain dicts for chat templates."""
        return [m.model_dump() for m in self.messages[:-1]]

    @property
    def answer(self) -> str:
        return self.messages[-1].content

    def content_key(self) -> str:
        """Identity for de-duplication: the conversation with whitespace and case folded."""
        folded = [(m.role, " ".join(m.content.split()).lower()) for m in self.messages]
        return hashlib.sha256(json.dumps(folded).encode()).hexdigest()


def write_records(path: Path, records: Iterable[ChatRecord]) -> int:
    """Write JSONL atomically; returns the number of records."""
    temporary = path.with_suffix(path.suffix + ".tmp")
    count = 0
    with temporary.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(record.model_dump_json(exclude_defaults=True) + "\n")
            count += 1
    temporary.replace(path)
    return count


def read_records(path: Path) -> Iterator[ChatRecord]:
    """Read records written by ``prepare``; any bad line is fatal (these files are ours)."""
    if not path.is_file():
        raise TrainerError(Reason.MISSING_DATA, f"{path}: no such dataset file (run immune-train prepare)")
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                yield ChatRecord.model_validate_json(line)
            except ValidationError as exc:
                raise TrainerError(Reason.BAD_RECORD, f"{path}:{number}: {_first_error(exc)}") from exc


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"])
    return f"{where}: {error['msg']}" if where else error["msg"]


def file_sha256(*paths: Path) -> str:
    """One digest over several files, in order (the provenance of a training run)."""
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()
