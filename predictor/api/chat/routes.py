"""The /chat routes: Kaito's ``POST /chat`` and the same payload on KServe's ``POST /v1/models/<name>:predict``,
answered whole or streamed as server-sent events.

``stream_chat`` is the ``"stream": true`` answer of ``POST /chat``: an event per generated token with the text it
completes (``""`` while a character is still partial; the prompt is not repeated), then the non-streaming response
body, then ``[DONE]``::

    data: {"index": 0, "token_id": 1013, "text": " upon"}
    data: {"index": 0, "token_id": 11, "text": "", "finish_reason": "stop"}
    data: {"Result": "Once upon", "details": {"prompt_tokens": 1, "generated_tokens": [2], ...}}
    data: [DONE]
"""

from __future__ import annotations

from contextlib import aclosing
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.responses import StreamingResponse

from ... import metrics
from ...engine.options import GenerationJob
from ...engine.scheduling.tickets import Ticket
from ...errors import Draining, PredictorError
from ..json_body import decode_json_body
from ..model import Completion, FalconModel
from ..openapi import SERVER_ERROR, errors, json_body
from ..streaming import sse_response, stream_text, unless_disconnected
from ..tracing import current_request_id
from .schema import ChatRequest, parse_chat_request

PREDICT_ROUTE = "/v1/models/{name}:predict"  # the route label in falcon_requests_total
CHAT_ERRORS = errors((400, 401, 404, 413, 429, 500, 503), SERVER_ERROR)


def install_chat_routes(app: FastAPI, model: FalconModel) -> None:
    @app.post("/chat", tags=["falcon"], summary="Generate text for a prompt (the Falcon /chat API)",
              openapi_extra=json_body(ChatRequest), responses=CHAT_ERRORS)
    async def chat(request: Request) -> Any:
        return await _chat(request, model, "/chat")

    # Ahead of KServe's own :predict route (added when the server starts), which cannot see a client leave, decodes
    # the body itself (losing duplicate keys) and cannot stream: here it has /chat's decoding, errors and streaming.
    @app.post("/v1/models/{model_name}:predict", tags=["falcon"], summary="The /chat API on KServe's v1 route",
              openapi_extra=json_body(ChatRequest), responses=CHAT_ERRORS)
    async def predict(model_name: str, request: Request) -> Any:
        return await _chat(request, model, PREDICT_ROUTE, model_name)


async def _chat(request: Request, model: FalconModel, route: str, model_name: str | None = None) -> Any:
    try:
        if model_name is not None:
            model.adapter_for(model_name, param=None)  # an unknown name: 404 before the body is read
        if model.draining:
            raise Draining("the server is shutting down and takes no new requests")
        chat_request = parse_chat_request(decode_json_body(await request.body()))
        job = await model.prepare(chat_request, model_name)
        ticket = model.submit(job, stream=chat_request.stream)
        if chat_request.stream:
            return stream_chat(model, job, ticket, route)
        finished, result = await unless_disconnected(request, ticket.result())
    except PredictorError as exc:
        metrics.REQUESTS.labels(route, exc.outcome).inc()
        raise
    if not finished:
        ticket.cancel()
        metrics.REQUESTS.labels(route, "cancelled").inc()
        return JSONResponse({"detail": "client disconnected"}, status_code=499)
    try:
        response = model.to_response(Completion(job, result))
    except PredictorError as exc:  # its text could not be made: counted as the failure it is
        metrics.REQUESTS.labels(route, exc.outcome).inc()
        raise
    metrics.REQUESTS.labels(route, "success").inc()
    return response


def stream_chat(model: FalconModel, job: GenerationJob, ticket: Ticket, route: str = "/chat") -> StreamingResponse:
    """The streaming answer of ``POST /chat`` (see the module docstring for its events)."""
    return sse_response(_chat_payloads(model, job, ticket), route, _chat_error)


async def _chat_payloads(model: FalconModel, job: GenerationJob, ticket: Ticket) -> AsyncIterator[dict[str, Any]]:
    async with aclosing(stream_text(model, job, ticket)) as deltas:
        async for delta in deltas:
            event: dict[str, Any] = {"index": delta.index, "token_id": delta.token_id, "text": delta.text}
            if delta.finish_reason is not None:
                event["finish_reason"] = delta.finish_reason
            yield event
    yield model.to_response(Completion(job, await ticket.result()))


def _chat_error(exc: PredictorError) -> dict[str, Any]:
    return {"error": exc.message, "error_type": exc.error_type, "request_id": current_request_id()}
