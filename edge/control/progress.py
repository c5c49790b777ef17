"""One deployment in progress: each forward state is reported once (also across restarts), and the
run ends with exactly one terminal event and its Outcome."""

from __future__ import annotations

import logging

from edge.control.crash_points import crash_point
from edge.control.reporting import Reporter
from edge.control.transitions import NEW_VERSION_PATH, check_transition
from edge.logs import fields
from edge.state.ledger import Deployment
from shared.errors import ReasonedError, TransientError
from shared.messages import DeploymentState
from shared.outcome import Outcome, ResultCode
from shared.reasons import Reason

log = logging.getLogger(__name__)

#: The forward order states are reported in (edge.control.transitions says which moves a kind may make).
FORWARD = (*NEW_VERSION_PATH, DeploymentState.COMMITTED)

_RESULT_OF = {
    DeploymentState.COMMITTED: ResultCode.COMMITTED,
    DeploymentState.ROLLED_BACK: ResultCode.ROLLED_BACK,
    DeploymentState.REJECTED: ResultCode.REJECTED,
    DeploymentState.FAILED: ResultCode.FAILED,
}


class DeploymentRun:
    """Reports the states of one deployment row."""

    def __init__(self, reporter: Reporter, deployment: Deployment, resumed: bool = False) -> None:
        self.reporter = reporter
        self.deployment = deployment
        # A new deployment's row starts as queued, but its queued event is still to be sent.
        self.reached: DeploymentState | None = deployment.state if resumed else None
        self.name: str | None = deployment.name
        self.serial: int | None = deployment.serial
        self.kind = deployment.kind

    def advance(self, state: DeploymentState, note: str | None = None) -> None:
        """Report ``state`` unless this run already reached it or a later one."""
        if self.reached is not None and FORWARD.index(state) <= FORWARD.index(self.reached):
            return
        if self.reached is not None or state is not DeploymentState.QUEUED:
            check_transition(self.kind, self.reached or DeploymentState.QUEUED, state)
        self.reporter.transition(
            self.deployment.id, state, note, self.name, self.serial, self.deployment.source
        )
        self.reached = state
        crash_point(self.kind, state)

    def end(self, state: DeploymentState, reason: Reason, message: str) -> Outcome:
        """Report the terminal ``state`` and return the run's Outcome."""
        check_transition(self.kind, self.reached or DeploymentState.QUEUED, state)
        self.reporter.transition(
            self.deployment.id, state, message, self.name, self.serial, self.deployment.source
        )
        self.reporter.status()  # the retained status carries the result too
        if state is not DeploymentState.REJECTED:  # a rejection is logged by the audit trail
            log.log(
                logging.INFO if state is DeploymentState.COMMITTED else logging.WARNING,
                "deployment %s %s: %s",
                self.deployment.id,
                state.value,
                message,
                extra=fields(
                    deployment=self.deployment.id, serial=self.serial, state=state.value, reason=reason
                ),
            )
        return Outcome(
            result=_RESULT_OF[state],
            message=message,
            reason=None if state is DeploymentState.COMMITTED else reason,
            deployment_id=self.deployment.id,
            serial=self.serial,
        )

    def fail(self, state: DeploymentState, exc: ReasonedError) -> Outcome:
        """End with ``state`` because of ``exc`` (its reason code leads the message)."""
        outcome = self.end(state, exc.reason, f"{exc.reason}: {exc}")
        return outcome.model_copy(update={"transient": isinstance(exc, TransientError)})
