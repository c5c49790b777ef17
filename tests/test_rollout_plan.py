"""Rollout planning and state files, without a broker: wave sizes, bad --waves, resume rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet.rollout import (
    DeviceProgress,
    FailureLimits,
    RolloutError,
    RolloutState,
    parse_waves,
    plan_waves,
    resumable_state,
)


def test_waves_are_cumulative_and_end_at_everyone() -> None:
    devices = [f"pi-{i:02d}" for i in range(10)]
    assert parse_waves("10%,50%,100%") == [0.1, 0.5, 1.0]
    assert parse_waves("25%") == [0.25, 1.0]  # never stops short silently
    waves = plan_waves(devices, canary=1, fractions=parse_waves("10%,50%,100%"))
    assert waves == [["pi-00"], devices[1:5], devices[5:]]
    assert plan_waves(devices[:3], canary=0, fractions=[0.5, 1.0]) == [devices[:2], devices[2:3]]
    assert sum(len(w) for w in plan_waves(devices, 3, [0.1, 1.0])) == len(devices)


@pytest.mark.parametrize("text", ["50%,10%", "0%", "abc", "150%", "50%,50%"])
def test_bad_waves_are_refused_with_the_option_named(text: str) -> None:
    with pytest.raises(RolloutError, match="--waves"):
        parse_waves(text)


def _state(**overrides: object) -> RolloutState:
    values: dict[str, object] = {
        "manifest_sha256": "a" * 64,
        "manifest_name": "m",
        "serial": 3,
        "group": "g",
        "canary": 1,
        "waves": [["pi-a"], ["pi-b"]],
        "max_failures": 0,
        "wave_timeout_s": 60,
        "rollback_on_halt": True,
        "next_wave": 1,
    }
    return RolloutState.model_validate(values | overrides)


def test_state_file_is_replaced_atomically(tmp_path: Path) -> None:
    path = tmp_path / "rollouts" / "m-3.json"
    state = _state()
    state.save(path)
    assert RolloutState.model_validate_json(path.read_text()) == state
    first = path.stat().st_ino
    state.next_wave = 2
    state.save(path)
    # A new file renamed over the old one (a plain write would keep the inode and could be cut short).
    assert path.stat().st_ino != first
    assert RolloutState.model_validate_json(path.read_text()).next_wave == 2
    assert not list(path.parent.glob("*.tmp"))


def test_resume_rules(tmp_path: Path) -> None:
    path = tmp_path / "m-3.json"
    assert resumable_state(path, "a" * 64) is None  # no state: a new rollout
    running = _state(devices={"pi-a": {"state": "committed"}, "pi-b": {"state": "sent"}})
    running.save(path)
    resumed = resumable_state(path, "a" * 64)
    assert resumed == running and resumed.next_wave == 1
    with pytest.raises(RolloutError, match="belongs to another manifest") as other:
        resumable_state(path, "b" * 64)
    assert other.value.reason == "rollout-mismatch"
    _state(status="halted", halted_reason="canary failed").save(path)
    with pytest.raises(RolloutError, match="halted \\(canary failed\\)") as halted:
        resumable_state(path, "a" * 64)
    assert halted.value.reason == "rollout-halted"


def test_failure_limits_count_then_rate_once_enough_finished() -> None:
    assert FailureLimits.from_options(None, None, 10) == FailureLimits(0, None, 10)  # safe default
    limits = FailureLimits.from_options(None, "5%", 20)
    assert limits == FailureLimits(None, 0.05, 20)
    devices = {f"pi-{i:03d}": {"state": "committed"} for i in range(19)} | {"pi-x": {"state": "failed"}}
    state = _state(max_failures=None, max_failure_rate=0.05, min_finished=20, devices=devices)
    assert state.halt_reason() is None  # 1 of 20 is 5%: not more than the limit
    state.devices["pi-y"] = DeviceProgress(state="failed")
    assert "2 of 21 finished devices failed (10%)" in (state.halt_reason() or "")
    early = _state(
        max_failures=None, max_failure_rate=0.05, min_finished=20, devices={"a": {"state": "failed"}}
    )
    assert early.halt_reason() is None  # one failure among the first answers is not a rate yet
    offline = _state(max_failures=0, devices={"a": {"state": "offline"}, "b": {"state": "committed"}})
    assert offline.halt_reason() is None and offline.finished == 1  # offline is not a failure
    assert "more than --max-failures 0" in (_state(devices={"a": {"state": "failed"}}).halt_reason() or "")
    for bad in ("five", "150%"):
        with pytest.raises(RolloutError, match="--max-failure-rate"):
            FailureLimits.from_options(None, bad, 1)
