"""Operator actions on the device: roll back to the previous or a cached serial, pin, unpin. Each
goes through the deployer's lock and reports like a deployment."""

from __future__ import annotations

from edge.control.deployer import Deployer
from edge.control.progress import DeploymentRun
from edge.state.ledger import ChangeKind, InstalledModel
from shared.errors import ReasonedError
from shared.messages import DeploymentState
from shared.outcome import Outcome, ResultCode
from shared.reasons import Reason


class OperatorActions:
    """rollback, pin and unpin, as the command handler and the CLI ask for them."""

    def __init__(self, deployer: Deployer) -> None:
        self.deployer = deployer
        self.ledger = deployer.ledger

    def rollback(self, serial: int | None, source: str, adapter: str | None = None) -> Outcome:
        """Go to the previous model or to a cached serial (the only way to a lower serial); with
        ``adapter``, that adapter's previous or cached version."""
        slot = adapter or ""
        with self.deployer.exclusive():
            target = self.ledger.previous(slot) if serial is None else self.ledger.find_serial(serial, slot)
            if target is None:
                what = "no previous version" if serial is None else f"serial {serial} is not cached"
                return _refused(f"rollback refused{_of(adapter)}: {what}", Reason.NOT_CACHED)
            return self._switch(target, source, ChangeKind.ROLLBACK)

    def pin(self, serial: int | None, source: str, adapter: str | None = None) -> Outcome:
        """Stay on the current (or a cached) model; desired state is ignored until unpinned. With
        ``adapter`` and ``serial``, that adapter is switched to the serial before the pin."""
        slot = adapter or ""
        with self.deployer.exclusive():
            message, deployment_id = "pinned to the current model", None
            if serial is not None:
                target = self.ledger.find_serial(serial, slot)
                if target is None:
                    return _refused(
                        f"pin refused{_of(adapter)}: serial {serial} is not cached", Reason.NOT_CACHED
                    )
                current = self.ledger.current(slot)
                if current is None or current.serial != serial:
                    switched = self._switch(target, source, ChangeKind.PIN)
                    if not switched.ok:
                        return switched
                    message, deployment_id = switched.message, switched.deployment_id
            self.ledger.set_pinned(True)
            self.deployer.reporter.status(note=f"pinned: {message}")
            return Outcome(
                result=ResultCode.DONE,
                message=f"pinned; {message}",
                deployment_id=deployment_id,
                serial=serial,
            )

    def unpin(self) -> Outcome:
        with self.deployer.exclusive():
            self.ledger.set_pinned(False)
            self.deployer.reporter.status(note="unpinned")
            return Outcome(result=ResultCode.DONE, message="unpinned; desired state applies again")

    def _switch(self, target: InstalledModel, source: str, kind: ChangeKind) -> Outcome:
        """Make a cached, previously verified model current again (its blobs are checked again)."""
        deployment = self.ledger.new_deployment(source, target.envelope, kind)
        self.ledger.describe_deployment(deployment.id, target.name, target.channel, target.serial, kind)
        run = DeploymentRun(self.deployer.reporter, deployment)
        run.name, run.serial = target.name, target.serial
        run.advance(DeploymentState.QUEUED)
        return self.switch_again(run, target)

    def switch_again(self, run: DeploymentRun, target: InstalledModel) -> Outcome:
        """The rest of an operator change (also for one a restart interrupted): the target checked
        in the store, then the deployer's one go-live. Call with the deployer's lock held."""
        try:
            self.deployer.check_cached(run, target)
        except ReasonedError as exc:  # missing or changed in the store (store-corrupt is transient)
            return run.fail(DeploymentState.FAILED, exc)
        ended = self.deployer.go_live(run, target)
        if ended.result is ResultCode.FAILED:  # could not activate (or interrupted): not carried out
            return ended
        return Outcome(
            result=ResultCode.DONE,
            message=ended.message,
            deployment_id=ended.deployment_id,
            serial=target.serial,
        )


def _of(adapter: str | None) -> str:
    return f" for adapter {adapter}" if adapter else ""


def _refused(message: str, reason: Reason) -> Outcome:
    return Outcome(result=ResultCode.FAILED, message=message, reason=reason)
