"""Staged rollouts: canary devices first, then waves of the group; each wave starts only when every
device of the previous one answered. Devices are started at most ``rate_per_minute`` a minute, so a
large wave does not storm the artifact store and the broker. The failure limits (a count, and/or a
rate judged once ``min_finished`` devices answered) are checked after every answer: past them the
rollout sends nothing more, waits for what it sent, and optionally rolls the halted wave's committed
devices back. A device that is offline when its turn comes, or that goes silent, is reported as
``offline`` and does not count as a failure: the rollout moves on. The state is a JSON file written
after every step, so an interrupted rollout resumes where it stopped."""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from fleet.client import FleetClient
from shared.errors import ContractError
from shared.manifest import Manifest
from shared.messages import CommandResponse
from shared.outcome import result_succeeded
from shared.reasons import Reason
from shared.signing import Envelope

#: How often a wave looks for answers while it waits.
POLL_S = 0.2

DeviceState = Literal["pending", "sent", "committed", "failed", "rolled_back", "offline"]
RolloutStatus = Literal["running", "halted", "done"]


class RolloutError(ContractError):
    """A rollout that cannot start or resume as asked."""


class DeviceProgress(BaseModel):
    model_config = ConfigDict(extra="forbid")

    state: DeviceState = "pending"
    reason: str | None = None
    at: float | None = None


class RolloutState(BaseModel):
    """Everything needed to resume a rollout; written to disk after every change."""

    model_config = ConfigDict(extra="forbid")

    manifest_sha256: str
    manifest_name: str
    serial: int
    group: str | None
    canary: Annotated[int, Field(ge=0)]
    waves: list[list[str]]
    #: Halt when more devices than this failed (None: no count limit).
    max_failures: Annotated[int, Field(ge=0)] | None
    wave_timeout_s: float
    rollback_on_halt: bool
    #: Halt when more than this share of the finished devices failed (None: no rate limit)...
    max_failure_rate: Annotated[float, Field(ge=0, le=1)] | None = None
    #: ...judged only once this many devices finished (a first failure is not 100%).
    min_finished: Annotated[int, Field(ge=1)] = 1
    #: Devices started per minute (None: a whole wave at once).
    rate_per_minute: Annotated[float, Field(gt=0)] | None = None
    next_wave: int = 0
    status: RolloutStatus = "running"
    halted_reason: str | None = None
    devices: dict[str, DeviceProgress] = {}

    @property
    def failures(self) -> int:
        return sum(1 for p in self.devices.values() if p.state in ("failed", "rolled_back"))

    @property
    def finished(self) -> int:
        """Devices that answered, committed or not (offline ones never did)."""
        return sum(1 for p in self.devices.values() if p.state in ("committed", "failed", "rolled_back"))

    def halt_reason(self) -> str | None:
        """Why the rollout must stop now, or None: the failure count, then the failure rate."""
        failed, finished = self.failures, self.finished
        if self.max_failures is not None and failed > self.max_failures:
            return f"{failed} device(s) failed, more than --max-failures {self.max_failures}"
        rate = self.max_failure_rate
        if rate is not None and finished >= self.min_finished and failed > rate * finished:
            return (
                f"{failed} of {finished} finished devices failed ({failed / finished:.0%}), more than "
                f"--max-failure-rate {rate:.0%} (judged from --min-finished {self.min_finished})"
            )
        return None

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.model_dump_json(indent=2))
        tmp.replace(path)  # never a half-written state file


@dataclass(frozen=True)
class FailureLimits:
    """When a rollout halts: more failures than ``max_failures``, or a failure rate above
    ``max_failure_rate`` once ``min_finished`` devices answered. Neither given: any failure."""

    max_failures: int | None = None
    max_failure_rate: float | None = None
    min_finished: int = 1

    @classmethod
    def from_options(cls, max_failures: int | None, rate: str | None, min_finished: int) -> FailureLimits:
        """From ``--max-failures``, ``--max-failure-rate 5%`` and ``--min-finished``."""
        fraction = None
        if rate is not None:
            try:
                fraction = float(rate.strip().removesuffix("%")) / 100
            except ValueError:
                raise RolloutError(
                    Reason.USAGE, f"--max-failure-rate: {rate!r} is not a percentage"
                ) from None
            if not 0 <= fraction <= 1:
                raise RolloutError(Reason.USAGE, f"--max-failure-rate: {rate!r} must be within 0% and 100%")
        if max_failures is None and fraction is None:
            max_failures = 0  # the safe default: the first failure halts
        return cls(max_failures, fraction, min_finished)


def parse_waves(text: str) -> list[float]:
    """``10%,50%,100%`` -> cumulative fractions, increasing, ending at 1."""
    fractions: list[float] = []
    for part in text.split(","):
        value = part.strip().removesuffix("%")
        try:
            fraction = float(value) / 100
        except ValueError:
            raise RolloutError(Reason.USAGE, f"--waves: {part!r} is not a percentage") from None
        if not 0 < fraction <= 1 or (fractions and fraction <= fractions[-1]):
            raise RolloutError(Reason.USAGE, f"--waves: {text!r} must increase, each in (0%, 100%]")
        fractions.append(fraction)
    if fractions[-1] != 1:
        fractions.append(1.0)  # a rollout that stops short would leave devices behind silently
    return fractions


def plan_waves(devices: list[str], canary: int, fractions: list[float]) -> list[list[str]]:
    """Canary wave (the first ``canary`` devices), then cumulative waves over all devices."""
    ordered = sorted(devices)
    waves = [ordered[:canary]] if canary else []
    done = len(waves[0]) if waves else 0
    for fraction in fractions:
        upto = max(math.ceil(fraction * len(ordered)), done)
        if upto > done:
            waves.append(ordered[done:upto])
            done = upto
    return [wave for wave in waves if wave]


def manifest_of(envelope_bytes: bytes) -> tuple[Manifest, str]:
    """The manifest inside a signed envelope (devices verify the signature; this only reads it)."""
    envelope = Envelope.from_json(envelope_bytes, what="manifest envelope")
    manifest = Manifest.from_json(envelope.payload_bytes(), what="manifest")
    return manifest, hashlib.sha256(envelope_bytes).hexdigest()


Progress = Callable[[str, RolloutState], None]


class Rollout:
    """Drives one rollout over an operator connection."""

    def __init__(
        self,
        client: FleetClient,
        envelope: bytes,
        state: RolloutState,
        state_path: Path,
        progress: Progress | None = None,
    ) -> None:
        self.client = client
        self.envelope = json.loads(envelope)
        self.state = state
        self.path = state_path
        self.progress = progress or (lambda message, state: None)

    def _say(self, message: str) -> None:
        self.state.save(self.path)
        self.progress(message, self.state)

    def run(self) -> RolloutState:
        """Run the remaining waves; returns the final state (done or halted)."""
        state = self.state
        while state.status == "running" and state.next_wave < len(state.waves):
            index = state.next_wave
            wave = state.waves[index]
            label = "canary" if index == 0 and state.canary else f"wave {index + 1}/{len(state.waves)}"
            self._say(f"{label}: {', '.join(wave)}")
            if reason := self._run_wave(wave):
                state.status = "halted"
                state.halted_reason = f"{reason} (in {label})"
                self._say(f"halted: {state.halted_reason}")
                if state.rollback_on_halt:
                    self._roll_back(wave)
                return state
            state.next_wave += 1
            offline = [d for d in wave if state.devices[d].state == "offline"]
            self._say(f"{label} done" + (f"; offline, not updated: {', '.join(offline)}" if offline else ""))
        if state.status == "running":
            state.status = "done"
            self._say("rollout complete")
        return state

    def _run_wave(self, wave: list[str]) -> str | None:
        """Start the wave's devices (paced), collect their answers; the halt reason, if any."""
        state = self.state
        queue = [d for d in wave if state.devices.setdefault(d, DeviceProgress()).state != "committed"]
        interval = 60.0 / state.rate_per_minute if state.rate_per_minute else 0.0
        waiting: dict[str, tuple[bytes, float]] = {}  # device -> (correlation, answer deadline)
        next_start, halt = time.monotonic(), state.halt_reason()
        while (queue and halt is None) or waiting:
            now = time.monotonic()
            if queue and halt is None and now >= next_start:
                self._start(queue.pop(0), waiting, now)
                next_start = now + interval
                continue
            for device, (correlation, until) in list(waiting.items()):
                response = self.client.response(correlation, 0)
                if response is None and time.monotonic() < until:
                    continue
                del waiting[device]
                self._record(device, response)
                halt = halt or state.halt_reason()
            if waiting or (queue and halt is None):
                wake = min([until for _, until in waiting.values()] + ([next_start] if queue else []))
                time.sleep(min(max(wake - time.monotonic(), 0.0), POLL_S))
        return halt

    def _start(self, device: str, waiting: dict[str, tuple[bytes, float]], now: float) -> None:
        progress = self.state.devices[device]
        if not self.client.is_online(device):
            progress.state, progress.reason = "offline", "offline when its turn came"
            progress.at = time.time()
            self._say(f"{device}: offline, skipped")
            return
        correlation = self.client.send_command(device, {"action": "rollout", "manifest": self.envelope})
        waiting[device] = (correlation, now + self.state.wave_timeout_s)
        progress.state, progress.reason, progress.at = "sent", None, time.time()
        self._say(f"{device}: sent")

    def _record(self, device: str, response: CommandResponse | None) -> None:
        progress = self.state.devices[device]
        progress.at = time.time()
        timeout = self.state.wave_timeout_s
        if response is None and not self.client.is_online(device):
            progress.state, progress.reason = "offline", f"went offline; no answer within {timeout:.0f} s"
        elif response is None:
            progress.state, progress.reason = "failed", f"no answer within {timeout:.0f} s"
        elif response.ok and result_succeeded(response.result.get("result")):
            progress.state, progress.reason = "committed", None
        else:
            reason = response.result.get("reason") or response.error or response.result.get("result")
            progress.state, progress.reason = "failed", str(reason)
        self._say(f"{device}: {progress.state}" + (f" ({progress.reason})" if progress.reason else ""))

    def _roll_back(self, wave: list[str]) -> None:
        """Send the wave's devices that took the new model back to their previous one."""
        for device in wave:
            progress = self.state.devices[device]
            if progress.state != "committed":
                continue  # a failed device is already back on its previous model
            response = self.client.command(device, {"action": "rollback"}, self.state.wave_timeout_s)
            progress.state = "rolled_back" if response.ok else "failed"
            progress.reason = (
                "rolled back after the halt" if response.ok else (response.error or "rollback failed")
            )
            self._say(f"{device}: {progress.reason}")


def resumable_state(path: Path, manifest_sha256: str) -> RolloutState | None:
    """The rules for running a rollout again: no state file, a new rollout (None); the state of
    another manifest is refused; a halted rollout is not retried silently; a running one resumes
    (devices already committed are skipped, devices only sent are sent again)."""
    if not path.exists():
        return None
    state = RolloutState.model_validate_json(path.read_text())
    if state.manifest_sha256 != manifest_sha256:
        raise RolloutError(
            Reason.ROLLOUT_MISMATCH, f"{path} belongs to another manifest; pass a different --state file"
        )
    if state.status == "halted":
        raise RolloutError(
            Reason.ROLLOUT_HALTED, f"{path}: halted ({state.halted_reason}); delete it to start over"
        )
    return state


def start_or_resume(
    client: FleetClient,
    envelope: bytes,
    state_path: Path | None,
    group: str | None,
    canary: int,
    waves: str,
    limits: FailureLimits,
    wave_timeout_s: float,
    rollback_on_halt: bool,
    rate_per_minute: float | None = None,
) -> tuple[RolloutState, Path]:
    """Load the state of this manifest's rollout if one was interrupted, else plan a new one from the
    devices that have reported a status (optionally only one group's)."""
    manifest, digest = manifest_of(envelope)
    path = state_path or client.settings.rollouts_dir / f"{manifest.name}-{manifest.serial}.json"
    if (resumed := resumable_state(path, digest)) is not None:
        return resumed, path
    devices = [view.device_id for view in client.snapshot(group)]
    if not devices:
        raise RolloutError(Reason.NO_DEVICES, f"no device of {group or 'the fleet'} has reported a status")
    if canary >= len(devices) and len(devices) > 1:
        raise RolloutError(Reason.USAGE, f"--canary {canary} covers all {len(devices)} devices")
    state = RolloutState(
        manifest_sha256=digest,
        manifest_name=manifest.name,
        serial=manifest.serial,
        group=group,
        canary=canary,
        waves=plan_waves(devices, canary, parse_waves(waves)),
        max_failures=limits.max_failures,
        max_failure_rate=limits.max_failure_rate,
        min_finished=limits.min_finished,
        wave_timeout_s=wave_timeout_s,
        rollback_on_halt=rollback_on_halt,
        rate_per_minute=rate_per_minute,
    )
    state.save(path)
    return state, path
