"""Operator commands: authenticate (threshold of operator keys, identity, expiry, nonce), then act."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

from edge.audit import RefusalKind
from edge.capture.commands import CaptureCommands
from edge.config import CaptureSettings
from edge.control.deployer import Deployer
from edge.control.operator import OperatorActions
from edge.control.reconcile import Reconciler
from edge.control.reporting import Reporter
from edge.control.trust import TrustStore
from edge.logs import fields
from edge.state.nonces import NonceStore
from shared.capture import CaptureChunk, CapturePullAction, CapturePurgeAction
from shared.errors import ContractError, SchemaError
from shared.messages import (
    COMMAND_PAYLOAD_TYPE,
    Command,
    CommandAction,
    CommandResponse,
    PinAction,
    RollbackAction,
    RolloutAction,
)
from shared.outcome import Outcome, ResultCode
from shared.reasons import Reason
from shared.signing import Role, verify_envelope
from shared.topics import TopicError, TopicKind, Topics

log = logging.getLogger(__name__)

ResultValue = str | int | float | bool | None


@dataclass(frozen=True)
class ReplyTo:
    """Where the answer goes: the MQTT v5 response topic and correlation data of the request."""

    topic: str | None
    correlation: bytes | None


class CommandHandler:
    """Checks and executes operator commands for one device."""

    def __init__(
        self,
        topics: Topics,
        device_id: str,
        trust: TrustStore,
        nonces: NonceStore,
        deployer: Deployer,
        reconciler: Reconciler,
        reporter: Reporter,
        clock_skew: timedelta,
        capture: CaptureCommands | None = None,
    ) -> None:
        self.topics = topics
        self.device_id = device_id
        self.trust = trust
        self.nonces = nonces
        self.deployer = deployer
        self.operator = OperatorActions(deployer)
        self.audit = deployer.audit
        self.reconciler = reconciler
        self.reporter = reporter
        self.clock_skew = clock_skew
        self.capture = capture or CaptureCommands(CaptureSettings(), None)

    def reply_to(self, response_topic: str | None, correlation: bytes | None) -> ReplyTo:
        """Accept only a response topic of this fleet's operator tree, so a command cannot make the
        device publish anywhere else."""
        if response_topic is None:
            return ReplyTo(None, correlation)
        try:
            ref = self.topics.parse(response_topic)
        except TopicError as exc:
            log.warning("ignoring response topic: %s", exc)
            return ReplyTo(None, correlation)
        if ref.kind is not TopicKind.RESPONSE:
            log.warning("ignoring response topic %r: not an operator response topic", response_topic)
            return ReplyTo(None, correlation)
        return ReplyTo(response_topic, correlation)

    def authenticate(self, payload: bytes) -> Command:
        """Signature threshold, schema, addressee, validity window, then nonce (claimed last, so a
        command refused for another reason can be corrected and re-sent with the same nonce)."""
        verified = verify_envelope(
            payload, self.trust.keyring, Role.OPERATOR, COMMAND_PAYLOAD_TYPE, what="command envelope"
        )
        command = Command.from_json(verified.payload)
        if command.device_id != self.device_id or command.fleet != self.topics.fleet:
            raise SchemaError(
                Reason.WRONG_DEVICE,
                f"command is for {command.fleet}/{command.device_id}, "
                f"this is {self.topics.fleet}/{self.device_id}",
            )
        now = self.reporter.clock()
        if now >= command.expires_at:
            raise SchemaError(
                Reason.EXPIRED, f"command {command.nonce} expired at {command.expires_at.isoformat()}"
            )
        if command.issued_at > now + self.clock_skew:
            raise SchemaError(
                Reason.NOT_YET_VALID,
                f"command {command.nonce} is issued in the future ({command.issued_at.isoformat()})",
            )
        if not self.nonces.claim(command.nonce, command.expires_at, now):
            raise SchemaError(Reason.REPLAYED, f"command nonce {command.nonce} was already used")
        return command

    def refuse(self, reply: ReplyTo, error: ContractError, origin: str, nonce: str | None = None) -> None:
        """Answer a command that was not executed; the refusal goes to the audit trail. A replayed
        nonce is not answered: MQTT delivers at least once, so it is usually a second copy of a
        command already answered, and a second answer would contradict the first."""
        self.audit.refused(RefusalKind.COMMAND, error.reason, origin, str(error), nonce=nonce)
        if error.reason is Reason.REPLAYED:
            return
        self._respond(
            reply,
            CommandResponse(
                nonce=nonce,
                device_id=self.device_id,
                ok=False,
                at=self.reporter.clock(),
                result={"reason": error.reason},
                error=f"{error.reason}: {error}"[:2048],
            ),
        )

    def status(self) -> dict[str, ResultValue]:
        """What the ``status`` command answers."""
        current, previous = self.deployer.ledger.current(), self.deployer.ledger.previous()
        last = self.deployer.ledger.last_deployment()
        return {
            "model": current.name if current else None,
            "serial": current.serial if current else None,
            "sha256": current.model_sha256 if current else None,
            "previous_serial": previous.serial if previous else None,
            "pinned": self.deployer.ledger.pinned,
            "cached_serials": ",".join(str(m.serial) for m in self.deployer.ledger.models()),
            "last_deployment_state": last.state.value if last else None,
            "last_result": self.reporter.last_result,
        }

    def execute(self, command: Command, reply: ReplyTo) -> CommandResponse:
        """Run an authenticated command and answer it."""
        action = command.action
        outcome, chunk, extra = self._carry_out(action, f"command:{command.nonce}")
        result: dict[str, ResultValue] = {
            "action": action.action,
            "result": outcome.result.value,
            "message": outcome.message[:1024],
        }
        if outcome.deployment_id:
            result["deployment_id"] = outcome.deployment_id
        if outcome.reason:
            result["reason"] = outcome.reason
        result.update(self.status())
        result.update(extra)
        response = CommandResponse(
            nonce=command.nonce,
            device_id=self.device_id,
            ok=outcome.ok,
            at=self.reporter.clock(),
            result=result,
            error=None if outcome.ok else outcome.message[:2048],
            capture=chunk,
        )
        log.info(
            "command %s %s: %s",
            command.nonce,
            action.action,
            outcome.message,
            extra=fields(nonce=command.nonce, deployment=outcome.deployment_id, reason=outcome.reason),
        )
        self._respond(reply, response)
        return response

    def _carry_out(
        self, action: CommandAction, source: str
    ) -> tuple[Outcome, CaptureChunk | None, dict[str, ResultValue]]:
        """Do what ``action`` asks: its outcome, a capture chunk (pull) and extra result fields."""
        chunk: CaptureChunk | None = None
        extra: dict[str, ResultValue] = {}
        if isinstance(action, CapturePullAction):
            outcome, chunk = self.capture.pull(action)
        elif isinstance(action, CapturePurgeAction):
            outcome = self.capture.purge(action)
            extra = self.capture.status()
        elif action.action == "capture_status":
            outcome, extra = Outcome(result=ResultCode.DONE, message="capture status"), self.capture.status()
        elif isinstance(action, RolloutAction):
            if self.deployer.ledger.pinned:
                outcome = Outcome(
                    result=ResultCode.FAILED,
                    message="rollout refused: the device is pinned (unpin first)",
                    reason=Reason.PINNED,
                )
            else:
                outcome = self.deployer.deploy(action.manifest.to_json(), source)
        elif isinstance(action, RollbackAction):
            outcome = self.operator.rollback(action.serial, source, action.adapter)
        elif isinstance(action, PinAction):
            outcome = self.operator.pin(action.serial, source, action.adapter)
        elif action.action == "unpin":
            outcome = self.operator.unpin()
            self.reconciler.changed()  # desired state held back while pinned applies now
        elif action.action == "gc":
            removed = self.deployer.collect_garbage(self.reconciler.wanted_envelopes())
            outcome = Outcome(result=ResultCode.DONE, message=f"removed {len(removed)} file(s)")
        else:
            outcome = Outcome(result=ResultCode.DONE, message="status")
        if isinstance(action, RolloutAction | RollbackAction):
            self.reconciler.changed()  # an adapter refused for the base served before may fit now
        return outcome, chunk, extra

    def _respond(self, reply: ReplyTo, response: CommandResponse) -> None:
        if reply.topic is None:
            # DEBUG: a flood of such commands must not become a flood of lines.
            log.debug("command without a usable response topic; not answering")
            return
        self.reporter.respond(reply.topic, reply.correlation, response)
