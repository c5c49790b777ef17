"""Structured outputs: what clients ask for (OpenAI ``response_format``, Ollama ``format``), checked
here so that a request either gets a grammar that enforces all of its schema or a 400 naming what
cannot be enforced. Nothing ever runs silently unconstrained.

The worker turns the schema into a llama.cpp grammar with llama-cpp-python's converter. That
converter skips keywords it does not know (``minimum``, ``not``, ``uniqueItems``...) without a word,
so the schema is walked first and anything outside the set the converter enforces is refused.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from pydantic import BaseModel, ConfigDict, Field, model_validator

from edge.api.errors import ApiError
from edge.runtime.protocol import JsonOutput

#: Keywords that change nothing about which texts are valid.
_ANNOTATIONS = frozenset(
    {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated"}
    | {"readOnly", "writeOnly"}
)
#: Keywords the grammar enforces (with the combinations checked in ``_check``).
_ENFORCED = frozenset(
    {"type", "enum", "const", "properties", "required", "additionalProperties", "items"}
    | {"prefixItems", "minItems", "maxItems", "anyOf", "oneOf", "allOf", "$ref", "$defs"}
    | {"definitions", "pattern", "format", "minLength", "maxLength"}
)
_FORMATS = frozenset({"date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4", "uuid5"})
_TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})


class UnenforceableSchemaError(ValueError):
    """The schema uses something the grammar cannot enforce; the message names it and where."""


def json_output(schema: dict[str, Any] | None, where: str) -> JsonOutput:
    """The worker's constraint for ``schema`` (None: any JSON object); ApiError 400 naming the
    problem when the schema is not valid JSON Schema or cannot be enforced. ``where`` is the
    request field holding it, for the message."""
    if schema is None:
        return JsonOutput()
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        path = "/".join(str(p) for p in exc.path)
        raise ApiError(
            400, f"{where} is not a valid JSON schema at /{path}: {exc.message}", "invalid_schema", where
        ) from None
    try:
        _check(schema, "#")
    except UnenforceableSchemaError as exc:
        raise ApiError(400, f"{where}: {exc}", "unsupported_schema", where) from None
    return JsonOutput(json_schema=schema)


def _check(schema: Any, at: str) -> None:
    if not isinstance(schema, dict):
        raise UnenforceableSchemaError(f"{at} must be a schema object (true/false schemas are not enforced)")
    unknown = sorted(set(schema) - _ENFORCED - _ANNOTATIONS)
    if unknown:
        raise UnenforceableSchemaError(
            f"{', '.join(unknown)} at {at} cannot be enforced by the grammar; remove it or check it yourself"
        )
    types = schema.get("type")
    for name in [types] if isinstance(types, str) else types or []:
        if name not in _TYPES:
            raise UnenforceableSchemaError(f"type {name!r} at {at} is not a JSON type")
    if (ref := schema.get("$ref")) is not None and not str(ref).startswith("#/"):
        raise UnenforceableSchemaError(f"$ref {ref!r} at {at}: only references inside the schema (#/...)")
    if (fmt := schema.get("format")) is not None and fmt not in _FORMATS:
        raise UnenforceableSchemaError(
            f"format {fmt!r} at {at} cannot be enforced (enforced: {', '.join(sorted(_FORMATS))})"
        )
    shaped = [k for k in ("pattern", "format") if k in schema]
    lengths = [k for k in ("minLength", "maxLength") if k in schema]
    if shaped and lengths:
        raise UnenforceableSchemaError(f"{lengths[0]} together with {shaped[0]} at {at} is not enforced")
    if "prefixItems" in schema and any(k in schema for k in ("items", "minItems", "maxItems")):
        raise UnenforceableSchemaError(f"prefixItems with items/minItems/maxItems at {at} is not enforced")
    properties = schema.get("properties", {})
    missing = sorted(set(schema.get("required", [])) - set(properties))
    if missing:
        raise UnenforceableSchemaError(f"required {', '.join(missing)} at {at} is not listed in properties")
    for name, sub in properties.items():
        _check(sub, f"{at}/properties/{name}")
    if isinstance(extra := schema.get("additionalProperties"), dict):
        _check(extra, f"{at}/additionalProperties")
    items = schema.get("items")
    if isinstance(items, dict):
        _check(items, f"{at}/items")
    for key in ("prefixItems", "anyOf", "oneOf", "allOf"):
        for i, sub in enumerate(schema.get(key, [])):
            _check(sub, f"{at}/{key}/{i}")
    if "allOf" in schema:
        for i, part in enumerate(schema["allOf"]):
            if not ("properties" in part or "$ref" in part or "anyOf" in part):
                raise UnenforceableSchemaError(f"{at}/allOf/{i}: allOf is enforced only for object schemas")
    for key in ("$defs", "definitions"):
        for name, sub in schema.get(key, {}).items():
            _check(sub, f"{at}/{key}/{name}")


# -- OpenAI response_format ------------------------------------------------------------------------
class _Format(BaseModel):
    # Anything unexpected is refused: a schema at the wrong level must not mean "no schema".
    model_config = ConfigDict(extra="forbid", strict=True)


class JsonSchemaSpec(_Format):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    description: str | None = None
    json_schema: dict[str, Any] = Field(alias="schema")
    #: Always enforced here, strict or not.
    strict: bool | None = None


class ResponseFormat(_Format):
    """OpenAI's ``response_format`` (one model rather than a tagged union, so that errors name the
    request's own fields)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    @model_validator(mode="before")
    @classmethod
    def _schema_at_the_wrong_level(cls, data: Any) -> Any:
        if isinstance(data, dict) and "schema" in data:
            raise ValueError('the schema goes in json_schema: {"name": ..., "schema": {...}}, not here')
        return data

    @model_validator(mode="after")
    def _schema_where_expected(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('type "json_schema" needs json_schema: {"name": ..., "schema": {...}}')
        if self.type != "json_schema" and self.json_schema is not None:
            raise ValueError(f'json_schema is only read with type "json_schema", not {self.type!r}')
        return self


def from_response_format(response_format: ResponseFormat | None) -> JsonOutput | None:
    """OpenAI's ``response_format`` as the worker's constraint (None: free text)."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.json_schema is None:
        return JsonOutput()
    return json_output(response_format.json_schema.json_schema, "response_format.json_schema.schema")


# -- Ollama format -----------------------------------------------------------------------------------
def from_ollama_format(fmt: str | dict[str, Any] | None) -> JsonOutput | None:
    """Ollama's ``format``: "json" (any JSON object) or a JSON schema; "" or None: free text."""
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return JsonOutput()
    if isinstance(fmt, str):
        raise ApiError(
            400, f'format must be "json" or a JSON schema object, not {fmt!r}', "invalid_format", "format"
        )
    return json_output(fmt, "format")
