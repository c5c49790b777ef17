"""Staged rollouts: canary devices first, then waves of the group; each wave starts only when every
device of the previous one reported ``committed``; the rollout halts (and optionally rolls the
affected devices back) once failures exceed the limit. The state is a JSON file written after every
step, so an interrupted rollout resumes where it stopped."""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from fleet.client import FleetClient
from shared.errors import ContractError
from shared.manifest import Manifest
from shared.outcome import result_succeeded
from shared.signing import Envelope

DeviceState = Literal["pending", "sent", "committed", "failed", "rolled_back"]
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
    max_failures: Annotated[int, Field(ge=0)]
    wave_timeout_s: float
    rollback_on_halt: bool
    next_wave: int = 0
    status: RolloutStatus = "running"
    halted_reason: str | None = None
    devices: dict[str, DeviceProgress] = {}

    @property
    def failures(self) -> int:
        return sum(1 for p in self.devices.values() if p.state in ("failed", "rolled_back"))

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.model_dump_json(indent=2))
        tmp.replace(path)  # never a half-written state file


def parse_waves(text: str) -> list[float]:
    """``10%,50%,100%`` -> cumulative fractions, increasing, ending at 1."""
    fractions: list[float] = []
    for part in text.split(","):
        value = part.strip().removesuffix("%")
        try:
            fraction = float(value) / 100
        except ValueError:
            raise RolloutError("usage", f"--waves: {part!r} is not a percentage") from None
        if not 0 < fraction <= 1 or (fractions and fraction <= fractions[-1]):
            raise RolloutError("usage", f"--waves: {text!r} must increase, each in (0%, 100%]")
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
            self._run_wave(wave)
            if state.failures > state.max_failures:
                state.status = "halted"
                state.halted_reason = (
                    f"{state.failures} device(s) failed in {label}, "
                    f"more than --max-failures {state.max_failures}"
                )
                self._say(f"halted: {state.halted_reason}")
                if state.rollback_on_halt:
                    self._roll_back(wave)
                return state
            state.next_wave += 1
            self._say(f"{label} committed")
        if state.status == "running":
            state.status = "done"
            self._say("rollout complete")
        return state

    def _run_wave(self, wave: list[str]) -> None:
        state = self.state
        sent: dict[str, bytes] = {}
        for device in wave:
            progress = state.devices.setdefault(device, DeviceProgress())
            if progress.state == "committed":
                continue  # resumed rollout: already done
            sent[device] = self.client.send_command(device, {"action": "rollout", "manifest": self.envelope})
            progress.state, progress.at = "sent", time.time()
        self._say(f"sent to {len(sent)} device(s); waiting up to {state.wave_timeout_s:.0f} s for commits")
        deadline = time.monotonic() + state.wave_timeout_s
        for device, correlation in sent.items():
            response = self.client.response(correlation, max(deadline - time.monotonic(), 0.0))
            progress = state.devices[device]
            progress.at = time.time()
            if response is None:
                progress.state, progress.reason = "failed", f"no answer within {state.wave_timeout_s:.0f} s"
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
            "rollout-mismatch", f"{path} belongs to another manifest; pass a different --state file"
        )
    if state.status == "halted":
        raise RolloutError(
            "rollout-halted", f"{path}: halted ({state.halted_reason}); delete it to start over"
        )
    return state


def start_or_resume(
    client: FleetClient,
    envelope: bytes,
    state_path: Path | None,
    group: str | None,
    canary: int,
    waves: str,
    max_failures: int,
    wave_timeout_s: float,
    rollback_on_halt: bool,
) -> tuple[RolloutState, Path]:
    """Load the state of this manifest's rollout if one was interrupted, else plan a new one from the
    devices that have reported a status (optionally only one group's)."""
    manifest, digest = manifest_of(envelope)
    path = state_path or client.settings.rollouts_dir / f"{manifest.name}-{manifest.serial}.json"
    if (resumed := resumable_state(path, digest)) is not None:
        return resumed, path
    devices = [view.device_id for view in client.snapshot(group)]
    if not devices:
        raise RolloutError("no-devices", f"no device of {group or 'the fleet'} has reported a status")
    if canary >= len(devices) and len(devices) > 1:
        raise RolloutError("usage", f"--canary {canary} covers all {len(devices)} devices")
    state = RolloutState(
        manifest_sha256=digest,
        manifest_name=manifest.name,
        serial=manifest.serial,
        group=group,
        canary=canary,
        waves=plan_waves(devices, canary, parse_waves(waves)),
        max_failures=max_failures,
        wave_timeout_s=wave_timeout_s,
        rollback_on_halt=rollback_on_halt,
    )
    state.save(path)
    return state, path
