"""Base class and field types for every payload that crosses a process or network boundary."""

from __future__ import annotations

import json
import re
from typing import Annotated, ClassVar, Self

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError

from shared.errors import SchemaError, schema_error
from shared.reasons import Reason

_IDENTIFIER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _identifier(value: str) -> str:
    # Identifiers become MQTT topic levels and file names: no '/', '+', '#', spaces or '..'.
    if not _IDENTIFIER.fullmatch(value) or ".." in value:
        raise ValueError(
            f"{value!r} is not a valid identifier (1-64 of A-Z a-z 0-9 _ . -, starting with a letter "
            "or digit, no '..')"
        )
    return value


def _file_name(value: str) -> str:
    if "/" in value or "\\" in value or ".." in value:
        raise ValueError(f"{value!r} must be a plain file name: no path separator and no '..'")
    if not _FILE_NAME.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a valid file name (1-128 of A-Z a-z 0-9 _ . + -, not starting with '.')"
        )
    return value


def _sha256_hex(value: str) -> str:
    if not _SHA256.fullmatch(value):
        raise ValueError("must be 64 lowercase hexadecimal characters (a sha256 digest)")
    return value


Identifier = Annotated[str, AfterValidator(_identifier)]
FileName = Annotated[str, AfterValidator(_file_name)]
Sha256Hex = Annotated[str, AfterValidator(_sha256_hex)]


def canonical_json(data: object) -> bytes:
    """Deterministic JSON bytes: sorted keys, no whitespace, UTF-8.

    DSSE signs exact bytes, so canonical form is not needed for security; it makes
    the same content always produce the same payload (stable hashes, reproducible signing).
    """
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


class Contract(BaseModel):
    """Strict, closed schema: unknown fields and wrong types are errors that name the field."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    #: Largest encoded payload accepted by :meth:`from_json`.
    MAX_BYTES: ClassVar[int] = 64 * 1024
    #: How errors name this payload ("manifest", "command"...).
    WHAT: ClassVar[str] = "payload"

    @classmethod
    def from_json(cls, data: bytes | str, what: str | None = None) -> Self:
        """Parse and validate JSON, refusing oversized input before parsing it."""
        label = what or cls.WHAT
        size = len(data.encode() if isinstance(data, str) else data)
        if size > cls.MAX_BYTES:
            raise SchemaError(
                Reason.TOO_LARGE, f"{label}: {size} bytes exceeds the limit of {cls.MAX_BYTES} bytes"
            )
        try:
            return cls.model_validate_json(data)
        except ValidationError as exc:
            raise schema_error(exc, label) from None

    def to_json(self) -> bytes:
        """Canonical JSON encoding of this payload."""
        return canonical_json(self.model_dump(mode="json", exclude_none=True))
