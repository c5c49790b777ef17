"""What a restart does to the deployments it interrupted: the ``on_restart`` column of the one
transition table (edge.control.transitions), applied oldest first."""

from __future__ import annotations

import logging

from edge.control.deployer import Deployer
from edge.control.operator import OperatorActions
from edge.control.progress import DeploymentRun
from edge.control.transitions import Resume, on_restart
from edge.state.ledger import Deployment, InstalledModel
from shared.messages import DeploymentState
from shared.outcome import Outcome

log = logging.getLogger(__name__)


class Recovery:
    """Settles the deployments a crash, power cut or stop interrupted, oldest first."""

    def __init__(self, deployer: Deployer, activation_retries: int) -> None:
        self.deployer = deployer
        self.activation_retries = activation_retries

    def resume_unfinished(self) -> list[Outcome]:
        outcomes = []
        for deployment in self.deployer.ledger.unfinished():
            how = on_restart(deployment.kind, deployment.state)
            log.info(
                "resuming %s deployment %s (%s): %s",
                deployment.kind.value,
                deployment.id,
                deployment.state.value,
                how.value,
            )
            if how is Resume.RETRY_ACTIVATION:
                outcomes.append(self._retry_activation(deployment))
            elif how is Resume.SWITCH_AGAIN:
                outcomes.append(self._switch_again(deployment))
            elif deployment.envelope is not None:
                outcomes.append(
                    self.deployer.deploy(deployment.envelope, deployment.source, resume=deployment)
                )
        return outcomes

    def _target(self, deployment: Deployment) -> InstalledModel | None:
        ledger = self.deployer.ledger
        if deployment.channel is None or deployment.serial is None:
            return None
        return ledger.model(deployment.channel, deployment.serial)

    def _unwind(self, model: InstalledModel) -> None:
        """The pointer had moved to ``model`` before the stop: the previous one is what runs
        meanwhile, and the go-live moves it again."""
        ledger = self.deployer.ledger
        current, previous = ledger.current(model.slot), ledger.previous(model.slot)
        if current is not None and current.key == model.key and previous is not None:
            ledger.switch_to(previous, accept_serial=False)

    def _switch_again(self, deployment: Deployment) -> Outcome:
        """An operator rollback or pin the stop interrupted: the same switch to its target again,
        never admission (the target is below the serial floor by design), no trial, no bad mark."""
        deployer = self.deployer
        with deployer.exclusive():
            run = DeploymentRun(deployer.reporter, deployment, resumed=True)
            interruptions = deployer.ledger.count_interruption(deployment.id)
            target = self._target(deployment)
            if target is None:
                return run.end(
                    DeploymentState.FAILED,
                    "not-cached",
                    f"not-cached: the {deployment.kind.value} target is no longer in the store",
                )
            self._unwind(target)
            if interruptions > self.activation_retries:
                deployer.activator.restore(deployer.ledger.current(target.slot), target.slot)
                reason = (
                    f"restart-during-activation: the daemon stopped {interruptions} times during this "
                    f"{deployment.kind.value} to serial {target.serial}"
                )
                return run.end(DeploymentState.FAILED, "restart-during-activation", reason)
            return OperatorActions(deployer).switch_again(run, target)

    def _retry_activation(self, deployment: Deployment) -> Outcome:
        deployer, ledger = self.deployer, self.deployer.ledger
        with deployer.exclusive():
            run = DeploymentRun(deployer.reporter, deployment, resumed=True)
            interruptions = ledger.count_interruption(deployment.id)
            model = self._target(deployment)
            if model is None:
                return run.end(
                    DeploymentState.FAILED, "interrupted", "interrupted: the daemon stopped during activation"
                )
            slot = model.slot  # an adapter has its own pointers
            self._unwind(model)
            if interruptions > self.activation_retries:
                reason = (
                    f"restart-during-trial: the daemon stopped {interruptions} times while serial "
                    f"{model.serial} was activating or on trial"
                )
                ledger.mark_bad(model.channel, model.serial, reason)
                if slot and ledger.current(slot) is not None and ledger.current(slot).key == model.key:
                    ledger.set_pointers(slot, None, None)  # a first adapter version: nothing to go back to
                deployer.activator.restore(ledger.current(slot), slot)
                if ledger.current(slot) is None or ledger.current(slot).key == model.key:
                    return run.end(DeploymentState.FAILED, "restart-during-trial", reason)
                return run.end(DeploymentState.ROLLED_BACK, "restart-during-trial", reason)
            log.warning(
                "deployment %s: activation of serial %d interrupted by a restart (%d of %d retries); "
                "trying it again",
                deployment.id,
                model.serial,
                interruptions,
                self.activation_retries,
            )
            return deployer.go_live(run, model)
