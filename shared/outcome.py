"""What became of one request to a device (a deployment, or an operator action), with the one rule
that says whether it succeeded. The device's CLI exit status, its command responses and
``immune-fleet``'s rollout all read success from here."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import Field

from shared.schema import Contract


class ResultCode(StrEnum):
    """How a request ended."""

    #: The deployment's model went live, passed its trial and is the current model.
    COMMITTED = "committed"
    #: The manifest names the model that is already current: nothing to do.
    ALREADY_INSTALLED = "already-installed"
    #: An operator action (rollback, pin, unpin, gc, status) was carried out.
    DONE = "done"
    #: The new model went live, failed its trial and the previous one is served again.
    ROLLED_BACK = "rolled_back"
    #: The input was bad or not for this device (signature, serial, compatibility, integrity, known bad).
    REJECTED = "rejected"
    #: The device could not finish (network, disk, load failure) or refused the action.
    FAILED = "failed"

    @property
    def success(self) -> bool:
        """The one success rule: a rolled-back deployment is not a success; an operator rollback that
        was carried out is (its result is ``done``)."""
        return self in _SUCCESS


_SUCCESS = frozenset({ResultCode.COMMITTED, ResultCode.ALREADY_INSTALLED, ResultCode.DONE})


class Outcome(Contract):
    """The result of one request, as the device reports it."""

    result: ResultCode
    message: Annotated[str, Field(max_length=4096)]
    #: Stable reason code (``serial-not-newer``, ``crash-loop``...); None on success.
    reason: Annotated[str, Field(max_length=64)] | None = None
    deployment_id: Annotated[str, Field(max_length=64)] | None = None
    serial: int | None = None
    #: The device could not finish for now (network, disk, a restart): the same request may succeed
    #: later, so desired state is retried.
    transient: bool = False

    @property
    def ok(self) -> bool:
        return self.result.success


def result_succeeded(result: object) -> bool:
    """Whether a ``result`` value read from a command response means success (unknown: no)."""
    try:
        return ResultCode(str(result)).success
    except ValueError:
        return False
