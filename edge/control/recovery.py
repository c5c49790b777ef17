"""What a restart does to a deployment it interrupted: one explicit table, state by state.

A Pi loses power. A deployment interrupted before its model went live is simply run again
(downloads continue from their partial files). One interrupted while its model was activating or on
trial is retried like a boot counter retries a new slot (RAUC, SWUpdate, U-Boot's bootcount): the
previous model serves again, then the new one is activated and tried once more, up to
``deploy.activation_retries`` times; after that the serial is marked bad and reported as
``known-bad`` with this reason whenever its desired state is seen again.
"""

from __future__ import annotations

import logging
from enum import StrEnum

from edge.control.deployer import Deployer
from edge.control.progress import DeploymentRun
from edge.state.ledger import Deployment
from shared.messages import DeploymentState
from shared.outcome import Outcome

log = logging.getLogger(__name__)


class Resume(StrEnum):
    """How an interrupted deployment continues after a restart."""

    #: Run it again from its signed envelope: admission again, downloads resumed by Range.
    REDO = "redo"
    #: Serve the previous model, then activate and try the new one again (bounded by a counter).
    RETRY_ACTIVATION = "retry-activation"


#: Stopped in state X resumes as Y. Terminal states are never resumed.
RECOVERY: dict[DeploymentState, Resume] = {
    DeploymentState.QUEUED: Resume.REDO,
    DeploymentState.DOWNLOADING: Resume.REDO,
    DeploymentState.VERIFYING: Resume.REDO,
    DeploymentState.STAGED: Resume.REDO,
    DeploymentState.ACTIVATING: Resume.RETRY_ACTIVATION,
    DeploymentState.TRIAL: Resume.RETRY_ACTIVATION,
}


class Recovery:
    """Settles the deployments a crash, power cut or stop interrupted, oldest first."""

    def __init__(self, deployer: Deployer, activation_retries: int) -> None:
        self.deployer = deployer
        self.activation_retries = activation_retries

    def resume_unfinished(self) -> list[Outcome]:
        outcomes = []
        for deployment in self.deployer.ledger.unfinished():
            how = RECOVERY[deployment.state]
            log.info("resuming deployment %s (%s): %s", deployment.id, deployment.state.value, how.value)
            if how is Resume.RETRY_ACTIVATION:
                outcomes.append(self._retry_activation(deployment))
            elif deployment.envelope is not None:
                outcomes.append(
                    self.deployer.deploy(deployment.envelope, deployment.source, resume=deployment)
                )
        return outcomes

    def _retry_activation(self, deployment: Deployment) -> Outcome:
        deployer, ledger = self.deployer, self.deployer.ledger
        with deployer.exclusive():
            run = DeploymentRun(deployer.reporter, deployment, resumed=True)
            interruptions = ledger.count_interruption(deployment.id)
            model = (
                ledger.model(deployment.channel, deployment.serial)
                if deployment.channel is not None and deployment.serial is not None
                else None
            )
            slot = model.slot if model is not None else ""  # an adapter has its own pointers
            current, previous = ledger.current(slot), ledger.previous(slot)
            if (
                model is not None
                and current is not None
                and current.key == model.key
                and previous is not None
            ):
                # The pointer had moved to the new model: the previous one is what runs meanwhile.
                ledger.switch_to(previous, accept_serial=False)
            if model is None:
                return run.end(
                    DeploymentState.FAILED, "interrupted", "interrupted: the daemon stopped during activation"
                )
            if interruptions > self.activation_retries:
                reason = (
                    f"restart-during-trial: the daemon stopped {interruptions} times while serial "
                    f"{model.serial} was activating or on trial"
                )
                ledger.mark_bad(model.channel, model.serial, reason)
                if slot and ledger.current(slot) is not None and ledger.current(slot).key == model.key:
                    ledger.clear_slot(slot)  # a first adapter version: nothing to go back to
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
