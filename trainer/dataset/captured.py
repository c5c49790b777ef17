"""Requests captured on the fleet as training records (``prepare --from-capture``): each archived
exchange a prompt profile recognises becomes a record of its request, grouped by the client's alert
id so no alert is split across train and held-out. The answer kept is the device model's own: it is
the baseline eval can compare with, never a training target (``distill`` replaces it, and finetune
refuses records that still carry it)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from shared.capture_archive import ArchivedExchange, CaptureArchive
from shared.errors import ContractError
from shared.reasons import Reason
from trainer.dataset.problems import Problems
from trainer.dataset.records import ChatMessage, ChatRecord
from trainer.errors import TrainerError
from trainer.prompts.profile import PromptProfile, ReadRequest, estimate_tokens

#: The teacher recorded on a captured answer: the device's model, not a teacher.
CAPTURED_TEACHER_PREFIX = "device:"


def captured_records(archive_path: Path, profile: PromptProfile, problems: Problems) -> Iterator[ChatRecord]:
    """The records of every exchange in the archive that ``profile`` recognises; the rest is reported."""
    try:
        archive = CaptureArchive(archive_path, create=False)
    except ContractError as exc:
        raise TrainerError(Reason.BAD_INPUT, str(exc)) from None
    try:
        for archived in archive.exchanges():
            where = f"{archive_path.name}[{archived.sha256[:12]}]"
            record = _record(archived, profile, where, problems)
            if record is not None:
                yield record
    finally:
        archive.close()


def _record(
    archived: ArchivedExchange, profile: PromptProfile, where: str, problems: Problems
) -> ChatRecord | None:
    exchange = archived.exchange
    messages = [{"role": m.role, "content": m.content} for m in exchange.messages]
    if not messages:
        problems.report(where, "a raw completion (no chat messages): no profile reads it")
        return None
    read = profile.read_request(messages)
    if isinstance(read, str):
        problems.report(where, f"not a {profile.name} request: {read}")
        return None
    if not exchange.answer.strip():
        problems.report(where, f"alert {read.incident_id} {read.label}: the captured answer is empty")
        return None
    devices = sorted({s.device for s in archived.sightings})
    models = sorted({f"{s.model_name}#{s.model_serial or '-'}" for s in archived.sightings})
    return ChatRecord(
        id=f"capture:{archived.sha256[:24]}",
        group=read.incident_id,
        task=profile.task,
        source=f"capture:{','.join(devices)}"[:256],
        teacher=f"{CAPTURED_TEACHER_PREFIX}{models[0]}",
        meta=_meta(profile, read, archived, devices, models),
        messages=[
            *(ChatMessage(role=m["role"], content=m["content"]) for m in messages if m["content"]),  # type: ignore[arg-type]
            ChatMessage(role="assistant", content=exchange.answer.strip()),
        ],
    )


def _meta(
    profile: PromptProfile,
    read: ReadRequest,
    archived: ArchivedExchange,
    devices: list[str],
    models: list[str],
) -> dict[str, str]:
    exchange = archived.exchange
    return {
        "source_ip": read.source_ip,
        "incident_id": read.incident_id,
        "profile": profile.name,
        "request": read.kind,
        "label": read.label,
        "max_tokens": str(exchange.max_tokens),
        "temperature": str(exchange.temperature),
        "estimated_tokens": str(estimate_tokens([m.model_dump() for m in exchange.messages])),
        "captured_sha256": archived.sha256,
        "captured_devices": ",".join(devices),
        "captured_models": ",".join(models),
        "captured_finish": exchange.finish_reason,
        "captured_redacted": ",".join(exchange.redacted),
        # What the device's model answered: eval's baseline with --baseline-captured (distill replaces the
        # record's answer, not this).
        "captured_answer": exchange.answer.strip(),
        "captured_model_sha256": ",".join(sorted({s.model_sha256 or "" for s in archived.sightings})),
    }


def refuse_captured_answers(records: list[ChatRecord], path: Path) -> None:
    """Training on a device model's own answers would teach it its mistakes: such records must go
    through ``distill`` first."""
    captured = [r.id for r in records if (r.teacher or "").startswith(CAPTURED_TEACHER_PREFIX)]
    if captured:
        raise TrainerError(
            Reason.UNDISTILLED_CAPTURE,
            f"{path}: {len(captured)} record(s) (first: {captured[0]}) still hold the device model's "
            "captured answer; run immune-train distill on the prepared folder and train on its output",
        )
