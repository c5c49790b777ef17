"""Operator actions on the device: roll back to the previous or a cached serial, pin, unpin. Each
goes through the deployer's lock and reports like a deployment."""

from __future__ import annotations

from edge.control.deployer import Deployer
from edge.control.progress import DeploymentRun
from edge.state.ledger import InstalledModel
from shared.admission import admit_files
from shared.artifacts import read_file_facts
from shared.errors import ArtifactError, ContractError
from shared.messages import DeploymentState
from shared.outcome import Outcome, ResultCode


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
                return _refused(f"rollback refused{_of(adapter)}: {what}", "not-cached")
            return self._switch(target, source, DeploymentState.ROLLED_BACK, "rollback")

    def pin(self, serial: int | None, source: str, adapter: str | None = None) -> Outcome:
        """Stay on the current (or a cached) model; desired state is ignored until unpinned. With
        ``adapter`` and ``serial``, that adapter is switched to the serial before the pin."""
        slot = adapter or ""
        with self.deployer.exclusive():
            message, deployment_id = "pinned to the current model", None
            if serial is not None:
                target = self.ledger.find_serial(serial, slot)
                if target is None:
                    return _refused(f"pin refused{_of(adapter)}: serial {serial} is not cached", "not-cached")
                current = self.ledger.current(slot)
                if current is None or current.serial != serial:
                    switched = self._switch(target, source, DeploymentState.COMMITTED, "pin")
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

    def _switch(self, target: InstalledModel, source: str, final: DeploymentState, verb: str) -> Outcome:
        """Make a cached, previously verified model current again (its blobs are checked again)."""
        deployer = self.deployer
        current = self.ledger.current(target.slot)
        run = DeploymentRun(deployer.reporter, self.ledger.new_deployment(source, target.envelope))
        run.name, run.serial = target.name, target.serial
        self.ledger.describe_deployment(run.deployment.id, target.name, target.channel, target.serial)
        run.advance(DeploymentState.QUEUED)
        run.advance(DeploymentState.VERIFYING)
        try:
            facts = {}
            for entry in target.manifest.files:
                path = deployer.store.blob_path(entry.sha256)
                if not path.is_file():
                    raise ArtifactError("not-cached", f"{verb}: blob {entry.sha256[:12]} is missing")
                facts[entry.name] = read_file_facts(
                    path, entry.role, deployer.device.allowed_architectures, sha256=entry.sha256
                )
            admit_files(target.manifest, facts, deployer.device.allowed_architectures)
        except ContractError as exc:
            return run.fail(DeploymentState.FAILED, exc)
        if (failed := deployer.activate(run, target, current)) is not None:
            return failed
        self.ledger.switch_to(target, accept_serial=False)
        deployer.activator.commit(target)
        frm = f"serial {current.serial}" if current else "no model"
        ended = run.end(final, verb, f"{verb}: {frm} -> {target.name} serial {target.serial}")
        return Outcome(
            result=ResultCode.DONE,
            message=ended.message,
            deployment_id=ended.deployment_id,
            serial=target.serial,
        )


def _of(adapter: str | None) -> str:
    return f" for adapter {adapter}" if adapter else ""


def _refused(message: str, reason: str) -> Outcome:
    return Outcome(result=ResultCode.FAILED, message=message, reason=reason)
