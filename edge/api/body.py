"""Request bodies: parsed as JSON whatever the Content-Type says, as Ollama does (its own
documentation calls it with curl -d and no header), then validated by the endpoint's model."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema

Body = TypeVar("Body", bound=BaseModel)


def json_body(model: type[Body]) -> Callable[[Request], Awaitable[Body]]:
    """A FastAPI dependency reading the body as ``model``; errors go through the app's 400 handler."""

    async def parse(request: Request) -> Body:
        raw = await request.body()
        try:
            return model.model_validate_json(raw)
        except ValidationError as exc:
            errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
            raise RequestValidationError(errors) from None

    return parse


#: The models of the bodies routes read with json_body, by name, for the OpenAPI document.
_DOCUMENTED: dict[str, type[BaseModel]] = {}


def documented_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` of a route that reads its body with ``json_body(model)``: FastAPI cannot
    see such a body (it is a dependency, not a body parameter), so it is declared here."""
    _DOCUMENTED[model.__name__] = model
    reference = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": reference}}}}


def openapi_with_bodies(app: FastAPI) -> dict[str, Any]:
    """The app's OpenAPI document, with the schemas of the bodies declared by :func:`documented_body`."""
    if app.openapi_schema is None:
        document = get_openapi(title=app.title, version=app.version, routes=app.routes)
        pairs = [(model, "validation") for model in _DOCUMENTED.values()]
        _, definitions = models_json_schema(pairs, ref_template="#/components/schemas/{model}")
        document.setdefault("components", {}).setdefault("schemas", {}).update(definitions.get("$defs", {}))
        app.openapi_schema = document
    return app.openapi_schema
