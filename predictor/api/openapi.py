"""The OpenAPI document's request bodies and error responses, generated from the parsers themselves.

The generation routes read their bodies by hand (``decode_json_body`` then a strict pydantic model), so FastAPI
documents no body for them. ``json_body(Model)`` gives a route's ``openapi_extra``: the body's JSON schema is
``Model``'s own, so the document cannot drift from what the route accepts; the values a route takes for fields it
does not model (OpenAI's ``best_of: 1``, which asks for nothing) are named beside it. ``errors(...)`` lists a
route's error responses with the error body's schema. ``install_openapi`` moves the models' shared definitions
into ``components.schemas`` so that ``/docs`` and generators resolve them.
"""

from __future__ import annotations

from typing import Any, Iterable

from fastapi import FastAPI
from pydantic import BaseModel

REF_TEMPLATE = "#/components/schemas/{model}"
_DEFS = "$defs"

OPENAI_ERROR = {"type": "object", "required": ["error"], "properties": {
    "object": {"const": "error"}, "request_id": {"type": "string"},
    "error": {"type": "object", "required": ["message", "type", "param", "code"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]},
        "code": {"type": "string"}}}}}
SERVER_ERROR = {"type": "object", "required": ["detail", "error_type"], "properties": {
    "detail": {"type": "string"}, "error": {"type": "string"}, "error_type": {"type": "string"},
    "param": {"type": ["string", "null"]}, "request_id": {"type": "string"}}}
ERROR_MEANINGS = {400: "the request is invalid: the body names the field at fault", 401: "no or a wrong api key",
                  404: "no such model or adapter", 413: "the body is larger than --max_body_bytes",
                  429: "the queue is full", 499: "the client closed the request", 500: "generation failed",
                  503: "loading, draining, or the engine stopped"}


def json_body(model: type[BaseModel], accepted: dict[str, tuple[Any, ...]] | None = None) -> dict[str, Any]:
    """A route's ``openapi_extra``: its JSON body is ``model``, plus ``accepted`` fields the route takes with only
    the values listed (and drops before validating)."""
    schema = model.model_json_schema(ref_template=REF_TEMPLATE)
    for name, values in (accepted or {}).items():
        schema["properties"][name] = {"enum": list(values), "description": "accepted with this value only"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def errors(codes: Iterable[int], schema: dict[str, Any] = OPENAI_ERROR) -> dict[int | str, dict[str, Any]]:
    """A route's ``responses``: each error status with its meaning and the error body's schema."""
    return {code: {"description": ERROR_MEANINGS[code], "content": {"application/json": {"schema": schema}}}
            for code in codes}


def install_openapi(app: FastAPI) -> None:
    """Serve the document with the request bodies' definitions in ``components.schemas``."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        document = generate()
        shared = document.setdefault("components", {}).setdefault("schemas", {})
        for operations in document.get("paths", {}).values():
            for operation in operations.values():
                body = operation.get("requestBody", {}).get("content", {}).get("application/json", {})
                for name, definition in body.get("schema", {}).pop(_DEFS, {}).items():
                    if shared.setdefault(name, definition) != definition:
                        raise ValueError(f"two request bodies define {name!r} differently: rename one model")
        app.openapi_schema = document
        return document

    app.openapi = openapi
