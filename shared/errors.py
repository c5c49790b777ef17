"""Error types for rejected input, with messages that name what was wrong."""

from __future__ import annotations

from pydantic import ValidationError

from shared.reasons import Reason


class ReasonedError(Exception):
    """An error that carries a stable reason code (``reason``, a ``Reason`` member) beside its human
    message; ``str(err)`` always names the offending field, key, file or signature."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        #: Converting checks the code: an unknown one is a programming error, caught by the tests.
        self.reason = Reason(reason)


class ContractError(ReasonedError, ValueError):
    """Input that does not satisfy a shared contract (schema, signature, size, topic...): permanent
    for that input, so it is refused, never retried."""


class TransientError(ReasonedError):
    """The device could not finish for now (network, disk, shutdown): the input may be fine and the
    same attempt may succeed later, so it is retried. Deliberately not a ContractError: code that
    refuses bad input must never catch it by accident."""


class SchemaError(ContractError):
    """A payload or file failed pydantic validation or JSON parsing."""


class SignatureError(ContractError):
    """A DSSE envelope or keyring update failed verification."""


class ArtifactError(ContractError):
    """An artifact file does not match its manifest entry."""


def describe_validation_error(exc: ValidationError, what: str, key_label: str = "") -> str:
    """Render a pydantic error as ``what: <key_label>field.path: problem``, one per error."""
    lines = []
    for err in exc.errors(include_url=False):
        location = ".".join(str(part) for part in err["loc"]) or "(top level)"
        lines.append(f"{what}: {key_label}{location}: {err['msg']}")
    return "; ".join(lines)


def schema_error(exc: ValidationError, what: str) -> SchemaError:
    """Wrap a pydantic ValidationError as a SchemaError naming the fields."""
    return SchemaError(Reason.SCHEMA, describe_validation_error(exc, what))
