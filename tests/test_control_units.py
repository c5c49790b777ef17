"""The device's control logic without a daemon or broker: the transition table, the deployer's one
go-live, restart recovery and desired-state reconciliation, driven through the ``Activator`` seam
(a scripted runtime) and a fake clock. The end-to-end tests with real processes stay beside these."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge.assembly import ControlPlane
from edge.config import EdgeConfig
from edge.control.activation import ActivationError, ActivationInterruptedError
from edge.control.operator import OperatorActions
from edge.control.reconcile import Reconciler
from edge.control.transitions import TABLE, Resume, TransitionError, check_transition, on_restart
from edge.state.ledger import ChangeKind, InstalledModel
from shared.config import load_config
from shared.messages import DeploymentState
from shared.outcome import ResultCode
from shared.reasons import Reason
from shared.topics import TopicKind, TopicRef
from tests.harness.broker import Mosquitto
from tests.harness.edge import sign_manifest, write_edge_config
from tests.test_edge_daemon import model_blob

S = DeploymentState


class ScriptedActivator:
    """A runtime whose next activation or trial fails (or is interrupted) when told to; records calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[str, int] | None]] = []
        self.fail_next: dict[str, Exception] = {}

    def _step(self, what: str, model: InstalledModel | None) -> None:
        self.calls.append((what, model.key if model is not None else None))
        if (error := self.fail_next.pop(what, None)) is not None:
            raise error

    def activate(self, model: InstalledModel) -> None:
        self._step("activate", model)

    def trial(self, model: InstalledModel) -> None:
        self._step("trial", model)

    def commit(self, model: InstalledModel) -> None:
        self._step("commit", model)

    def restore(self, model: InstalledModel | None, slot: str = "") -> None:
        self._step("restore", model)


class Device:
    """A control plane on a state directory, with helpers to install local fake models."""

    def __init__(self, tmp_path: Path, keys, retries: int = 2) -> None:
        self.tmp_path, self.keys = tmp_path, keys
        config = write_edge_config(tmp_path / "device", Mosquitto(tmp_path / "unused"), keys.keyring())
        config.write_text(
            config.read_text().replace("[deploy]\n", f"[deploy]\nactivation_retries = {retries}\n")
        )
        self.config_file = config
        self.activator = ScriptedActivator()
        self.open()

    def open(self) -> None:
        self.node = ControlPlane.open(load_config(self.config_file, EdgeConfig), activator=self.activator)
        self.deployer, self.ledger = self.node.deployer, self.node.ledger

    def restart(self) -> None:
        self.node.close()
        self.open()

    def envelope(self, tag: str, serial: int) -> tuple[bytes, Path]:
        data = model_blob(tag, size=4096)
        path = self.tmp_path / f"{tag}.gguf"
        path.write_bytes(data)
        return sign_manifest([self.keys.trainer], data, "http://127.0.0.1:9/unused.gguf", serial=serial), path

    def install(self, tag: str, serial: int):
        envelope, path = self.envelope(tag, serial)
        return self.deployer.deploy(envelope, "test", local_files={"model.gguf": path})


@pytest.fixture
def device(tmp_path, fleet_keys) -> Iterator[Device]:
    made = Device(tmp_path, fleet_keys)
    yield made
    made.node.close()


# -- the transition table -------------------------------------------------------------------------------
def test_every_unfinished_state_of_every_kind_has_a_row_and_ends_are_terminal() -> None:
    for kind in ChangeKind:
        rows = {state for (k, state) in TABLE if k is kind}
        assert rows and all(not state.terminal for state in rows), (kind, rows)
        for state in rows:  # every move leads to another row or to an end
            assert all(then in rows or then.terminal for then in TABLE[(kind, state)].then)
    assert on_restart(ChangeKind.MODEL, S.DOWNLOADING) is Resume.REDO
    assert on_restart(ChangeKind.ADAPTER, S.TRIAL) is Resume.RETRY_ACTIVATION
    assert on_restart(ChangeKind.ROLLBACK, S.ACTIVATING) is Resume.SWITCH_AGAIN


@pytest.mark.parametrize(
    ("kind", "reached", "state"),
    [
        (ChangeKind.ROLLBACK, S.ACTIVATING, S.TRIAL),  # an operator change gets no trial
        (ChangeKind.ROLLBACK, S.QUEUED, S.DOWNLOADING),  # nor a download
        (ChangeKind.PIN, S.ACTIVATING, S.ROLLED_BACK),
        (ChangeKind.MODEL, S.TRIAL, S.QUEUED),  # never backwards
        (ChangeKind.MODEL, S.COMMITTED, S.FAILED),  # nothing after an end
    ],
)
def test_a_move_the_table_lacks_is_refused(kind, reached, state) -> None:
    with pytest.raises(TransitionError, match=f"cannot go from {reached.value} to {state.value}"):
        check_transition(kind, reached, state)


# -- the deployer's go-live -------------------------------------------------------------------------------
def test_a_failed_trial_marks_the_serial_bad_and_serves_the_previous_model(device: Device) -> None:
    assert device.install("one", 1).result is ResultCode.COMMITTED
    device.activator.fail_next["trial"] = ActivationError(Reason.TRIAL_ERRORS, "answers were empty")
    outcome = device.install("two", 2)
    assert (outcome.result, outcome.reason) == (ResultCode.ROLLED_BACK, Reason.TRIAL_ERRORS)
    assert device.ledger.current().serial == 1 and device.ledger.previous() is None
    assert device.ledger.bad_serials() == {("stable", 2): "trial-errors: answers were empty"}
    assert device.ledger.last_serial("stable") == 2  # the floor stays: serial 2 is not offered again
    assert device.activator.calls[-1] == ("restore", ("stable", 1))


def test_a_model_that_cannot_start_fails_without_a_bad_mark(device: Device) -> None:
    assert device.install("one", 1).ok
    device.activator.fail_next["activate"] = ActivationError(Reason.LOAD_FAILED, "out of memory")
    outcome = device.install("two", 2)
    assert (outcome.result, outcome.reason) == (ResultCode.FAILED, "load-failed")
    assert device.ledger.current().serial == 1 and device.ledger.bad_serials() == {}
    assert device.ledger.last_serial("stable") == 1


def test_a_rollback_keeps_the_floor_gets_no_trial_and_a_pin_pins(device: Device) -> None:
    device.install("one", 1)
    device.install("two", 2)
    device.activator.calls.clear()
    actions = OperatorActions(device.deployer)
    assert actions.rollback(None, "operator").result is ResultCode.DONE
    assert [what for what, _ in device.activator.calls] == ["activate", "commit"]
    assert device.ledger.current().serial == 1 and device.ledger.last_serial("stable") == 2
    assert actions.pin(2, "operator").ok and device.ledger.pinned
    assert device.ledger.current().serial == 2 and device.ledger.last_deployment().kind is ChangeKind.PIN


# -- restart recovery -------------------------------------------------------------------------------------
def _interrupted_in_trial(device: Device) -> None:
    device.install("one", 1)
    device.activator.fail_next["trial"] = ActivationInterruptedError(
        Reason.SHUTDOWN, "the daemon is stopping"
    )
    outcome = device.install("two", 2)
    assert outcome.reason == "interrupted" and device.ledger.last_deployment().state is S.TRIAL


def test_a_model_interrupted_on_trial_is_tried_again_after_a_restart(device: Device) -> None:
    _interrupted_in_trial(device)
    device.restart()
    (outcome,) = device.node.recovery.resume_unfinished()
    assert outcome.result is ResultCode.COMMITTED and device.ledger.current().serial == 2
    # The previous model served while the new one was tried again.
    assert ("restore", ("stable", 1)) not in device.activator.calls[-3:]
    assert device.activator.calls[-3:] == [("activate", ("stable", 2)), ("trial", ("stable", 2)),
                                           ("commit", ("stable", 2))]  # fmt: skip


def test_a_model_interrupted_too_often_is_marked_bad(tmp_path, fleet_keys) -> None:
    device = Device(tmp_path, fleet_keys, retries=0)
    try:
        _interrupted_in_trial(device)
        device.restart()
        (outcome,) = device.node.recovery.resume_unfinished()
        assert (outcome.result, outcome.reason) == (ResultCode.ROLLED_BACK, "restart-during-trial")
        assert device.ledger.current().serial == 1 and ("stable", 2) in device.ledger.bad_serials()
    finally:
        device.node.close()


def test_a_rollback_interrupted_while_activating_is_switched_again(device: Device) -> None:
    device.install("one", 1)
    device.install("two", 2)
    device.activator.calls.clear()
    device.activator.fail_next["activate"] = ActivationInterruptedError(
        Reason.SHUTDOWN, "the daemon is stopping"
    )
    OperatorActions(device.deployer).rollback(None, "operator")
    row = device.ledger.last_deployment()
    assert (row.kind, row.state) == (ChangeKind.ROLLBACK, S.ACTIVATING)
    device.restart()
    (outcome,) = device.node.recovery.resume_unfinished()
    assert outcome.result is ResultCode.DONE and device.ledger.deployment(row.id).state is S.ROLLED_BACK
    assert device.ledger.current().serial == 1 and device.ledger.last_serial("stable") == 2
    assert device.ledger.bad_serials() == {} and "trial" not in [w for w, _ in device.activator.calls]


# -- reconciliation -------------------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _ref(kind: TopicKind) -> TopicRef:
    return TopicRef(kind=kind, fleet="lab")


def test_reconciliation_settles_picks_the_most_specific_level_and_acts_once(device: Device) -> None:
    clock = Clock()
    groups = tuple(device.node.config.device.groups)
    reconciler = Reconciler(device.deployer, groups, settle_s=1.0, retry_failed_s=5.0, clock=clock)
    fleet_env, fleet_file = device.envelope("fleet", 1)
    device_env, device_file = device.envelope("device", 2)
    for path in (fleet_file, device_file):  # the store is seeded: no download needed
        device.node.store.import_file(path, *_facts(path))
    reconciler.received(_ref(TopicKind.DESIRED_FLEET), fleet_env)
    reconciler.received(_ref(TopicKind.DESIRED_DEVICE), device_env)
    assert not reconciler.take_due()  # still settling
    clock.now = 1.5
    assert reconciler.take_due() and not reconciler.take_due()  # one queued at a time
    (outcome,) = reconciler.reconcile()
    assert outcome.serial == 2 and device.ledger.current().serial == 2
    reconciler.changed()
    assert reconciler.take_due() and reconciler.reconcile() == []  # already acted on

    device.ledger.set_pinned(True)
    newer, newer_file = device.envelope("newer", 3)
    device.node.store.import_file(newer_file, *_facts(newer_file))
    reconciler.received(_ref(TopicKind.DESIRED_DEVICE), newer)
    clock.now = 3.0
    assert reconciler.take_due() and reconciler.reconcile() == []  # pinned: waits
    device.ledger.set_pinned(False)
    reconciler.changed()
    assert reconciler.take_due() and [o.serial for o in reconciler.reconcile()] == [3]


def _facts(path: Path) -> tuple[str, int]:
    data = path.read_bytes()
    return hashlib.sha256(data).hexdigest(), len(data)
