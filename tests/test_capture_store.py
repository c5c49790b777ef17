"""The device's capture store and redaction without a daemon: the byte budget and the retention age
enforced with the oldest dropped first, chunked reads that always make progress, purges that start a
new store, the file's mode, and addresses replaced consistently within a store and only there."""

from __future__ import annotations

import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from edge.capture.redact import Redactor
from edge.capture.store import CaptureStore
from shared.capture import CapturedExchange, CapturePurgeAction
from trainer.dataset.captured import refuse_captured_answers
from trainer.dataset.records import ChatMessage, ChatRecord
from trainer.errors import TrainerError
from trainer.measure import captured_answers


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 12, 1, tzinfo=UTC).timestamp()

    def __call__(self) -> float:
        return self.now


def _exchange(text: str, at: float, answer: str = "An answer.") -> CapturedExchange:
    return CapturedExchange(
        at=datetime.fromtimestamp(at, UTC),
        endpoint="/v1/chat/completions",
        model_name="slips-summary",
        messages=[{"role": "user", "content": text}],  # type: ignore[list-item]
        answer=answer,
        finish_reason="stop",
        prompt_tokens=10,
        completion_tokens=3,
        max_tokens=220,
        temperature=0.2,
    )


def _store(tmp_path: Path, clock: Clock, max_bytes: int = 1 << 20, days: float = 30) -> CaptureStore:
    return CaptureStore(tmp_path / "capture.db", max_bytes, timedelta(days=days), clock)


def test_the_byte_budget_drops_the_oldest_first_and_is_never_exceeded(tmp_path: Path) -> None:
    clock = Clock()
    one = len(_exchange("x" * 1000, clock.now).to_json())
    store = _store(tmp_path, clock, max_bytes=one * 5 + one // 2)
    seqs = [store.add(_exchange("x" * 1000, clock.now)) for _ in range(12)]
    held = store.held()
    assert held.bytes <= store.max_bytes and held.records == 5
    assert (held.first_seq, held.last_seq) == (seqs[-5], seqs[-1])  # the newest five, the oldest gone
    # Bigger than the whole budget: not kept, and nothing else was dropped for it.
    assert store.add(_exchange("y" * one * 6, clock.now)) is None
    assert store.held().records == 5
    # The file gives deleted pages back: it stays near the budget, not at its high-water mark.
    assert (tmp_path / "capture.db").stat().st_size < store.max_bytes + 64 * 1024


def test_the_retention_age_is_enforced_on_write_and_when_idle(tmp_path: Path) -> None:
    clock = Clock()
    store = _store(tmp_path, clock, days=1)
    old = store.add(_exchange("old", clock.now))
    clock.now += 12 * 3600
    store.add(_exchange("newer", clock.now))
    clock.now += 13 * 3600  # the first is 25 hours old now
    store.add(_exchange("newest", clock.now))
    assert store.held().first_seq != old and store.held().records == 2
    clock.now += 2 * 86400
    assert store.expire() == 2 and store.held().records == 0


def test_chunks_follow_the_cursor_and_always_carry_one_exchange(tmp_path: Path) -> None:
    clock = Clock()
    store = _store(tmp_path, clock)
    for index in range(5):
        store.add(_exchange(f"request {index} " + "z" * 3000, clock.now + index))
    first = store.chunk(0, None, 7000)
    assert [e.seq for e in first.exchanges] == [1, 2] and first.more and first.next_seq == 2
    rest = store.chunk(first.next_seq, None, 1 << 20)
    assert [e.seq for e in rest.exchanges] == [3, 4, 5] and not rest.more
    # A chunk smaller than one exchange still moves on by one.
    assert [e.seq for e in store.chunk(0, None, 4096).exchanges] == [1]
    # since: only what was captured from then on.
    since = datetime.fromtimestamp(clock.now + 3, UTC)
    assert [e.seq for e in store.chunk(0, since, 1 << 20).exchanges] == [4, 5]
    assert store.chunk(5, None, 1 << 20).exchanges == [] and store.chunk(5, None, 1 << 20).next_seq == 5


def test_a_purge_of_everything_starts_a_new_store(tmp_path: Path) -> None:
    clock = Clock()
    store = _store(tmp_path, clock)
    for _ in range(3):
        store.add(_exchange("a", clock.now))
    before = store.store_id
    assert store.purge(up_to_seq=2) == 2 and store.held().records == 1
    assert store.store_id == before
    assert store.purge() == 1 and store.held().records == 0
    assert store.store_id != before
    # Sequence numbers never go back within one file: a cursor of the old store cannot skip new data.
    assert store.add(_exchange("b", clock.now)) == 4
    with pytest.raises(ValueError, match="up_to_seq needs the store_id"):
        CapturePurgeAction.model_validate({"action": "capture_purge", "up_to_seq": 3})


def test_the_store_is_private_to_the_service_user(tmp_path: Path) -> None:
    path = tmp_path / "capture.db"
    path.touch(mode=0o644)
    _store(tmp_path, Clock()).add(_exchange("a", Clock().now))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_redaction_is_consistent_within_a_store_and_keeps_the_text_readable(tmp_path: Path) -> None:
    store = _store(tmp_path, Clock())
    redactor = Redactor(["ipv4", "ipv6", "mac"], store)
    text = (
        "192.168.1.113 scanned 8.8.8.8:53 and 8.8.4.4 at 10:00:00 from aa:bb:cc:dd:ee:0f; "
        "fe80::1 and 2a00:1450:4001::200e. Version 1.2.3 on port 443. Again from 192.168.1.113."
    )
    once = redactor.text(text)
    originals = (
        "192.168.1.113",
        "8.8.8.8",
        "8.8.4.4",
        "aa:bb:cc:dd:ee:0f",
        "fe80::1",
        "2a00:1450:4001::200e",
    )
    assert not [original for original in originals if original in once], once
    assert once.count("10.0.0.1") == 2  # the same host is the same placeholder throughout
    assert "198.18.0.1:53" in once and "198.18.0.2" in once  # public addresses: the benchmark range
    assert "02:00:00:00:00:01" in once and "2001:db8::1" in once and "2001:db8::2" in once
    assert "10:00:00" in once and "1.2.3" in once and "port 443" in once  # times and versions stay
    assert redactor.text("again 8.8.4.4 and AA-BB-CC-DD-EE-0F") == "again 198.18.0.2 and 02:00:00:00:00:01"
    # The map keeps keyed digests, never an address.
    raw = (tmp_path / "capture.db").read_bytes()
    assert b"192.168.1.113" not in raw and b"8.8.8.8" not in raw
    # A purged store is a new capture file: the old placeholders mean nothing there.
    store.purge()
    assert Redactor(["ipv4"], store).text("8.8.4.4") == "198.18.0.1"


def test_training_refuses_the_device_models_own_answers() -> None:
    record = ChatRecord(
        id="capture:1",
        group="alert-1",
        task="slips-summary",
        source="capture:pi-1",
        teacher="device:slips-summary#3",
        messages=[ChatMessage(role="user", content="q"), ChatMessage(role="assistant", content="a")],
    )
    with pytest.raises(TrainerError, match="run immune-train distill") as refused:
        refuse_captured_answers([record], Path("train.jsonl"))
    assert refused.value.reason == "undistilled-capture"
    refuse_captured_answers([record.model_copy(update={"teacher": "teacher-model"})], Path("train.jsonl"))


def test_a_captured_baseline_needs_records_prepared_from_capture() -> None:
    record = ChatRecord(
        id="alert-summary-v2:x:final",
        group="x",
        task="slips-summary",
        source="fixture",
        meta={
            "profile": "alert-summary-v2",
            "request": "final",
            "source_ip": "10.0.0.1",
            "max_tokens": "220",
        },
        messages=[ChatMessage(role="user", content="q"), ChatMessage(role="assistant", content="a")],
    )
    with pytest.raises(TrainerError, match="needs records prepared with --from-capture") as refused:
        captured_answers([record])
    assert refused.value.reason == "bad-baseline"
    kept = record.model_copy(
        update={
            "meta": {
                **record.meta,
                "captured_answer": "Likely true positive, high risk: 10.0.0.1 scans.",
                "captured_finish": "stop",
            }
        }
    )
    (row,) = captured_answers([kept]).tasks
    assert row["gives_verdict"] == 1.0 and row["names_source_ip"] == 1.0 and row["within_budget"] == 1.0
