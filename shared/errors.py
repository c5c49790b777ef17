"""Error types for rejected input, with messages that name what was wrong."""

from __future__ import annotations

from pydantic import ValidationError


class ContractError(ValueError):
    """Input that does not satisfy a shared contract (schema, signature, size, topic...).

    ``reason`` is a short stable code (for events and tests); ``str(err)`` is the
    human message, which always names the offending field, key or signature.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class TransientError(ContractError):
    """The device could not finish for now (network, disk): the same input may succeed later, so it
    is retried; every other ContractError is permanent for that input."""


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
    return SchemaError("schema", describe_validation_error(exc, what))
